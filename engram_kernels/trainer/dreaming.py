"""Dreaming: turn a new document into training examples before it is written into memory.

Three generators: deterministic fallbacks (raw text, sentence cloze, Q/A templates, question
rephrasings; no model), self-study (the model itself, with the document in its prompt, writes Q/A
pairs and a rephrasing) and an external OpenAI-compatible endpoint doing the same. drop_known
removes the examples the model already gets right (low loss on the target tokens).
"""
import dataclasses
import functools
import json
import math
import re
import urllib.error
import urllib.request

import torch

KINDS = ("raw", "cloze", "qa", "rephrase", "self_qa", "self_rephrase")


@dataclasses.dataclass
class Example:
    """Train on `target` given `prompt` (loss on target tokens only); `context` is the source
    document text, which the context-distillation teacher sees in front of the prompt."""
    prompt: str
    target: str
    kind: str
    doc_id: str
    context: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown example kind {self.kind!r}; expected one of {KINDS}")
        if not self.target.strip():
            raise ValueError(f"example of kind {self.kind!r} for document {self.doc_id} has an empty target")


def format_prompt(tokenizer, prompt, system=None):
    """The prompt as the model sees it: the tokenizer's chat template (one user turn, generation
    prompt appended) when it has one, else the plain text and a newline before the answer."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system}\n\n{prompt}\n" if system else f"{prompt}\n"


def prompt_ids(tokenizer, prompt):
    """Token ids of format_prompt(prompt); an empty prompt starts from the bos (else eos) token."""
    if prompt:
        return tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("tokenizer has neither a bos nor an eos token to start text from")
    return [start]


@functools.lru_cache(maxsize=8)
def template_edges(tokenizer):
    """(tokens before, tokens after) the user's text in prompt_ids: the chat template's fixed parts."""
    a, b = prompt_ids(tokenizer, "x y"), prompt_ids(tokenizer, "z w v")
    before = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), 0)
    after = next((i for i in range(min(len(a), len(b)) - before) if a[-1 - i] != b[-1 - i]), 0)
    return before, after


def document_context(doc):
    """The text an example's teacher sees: the document text, or "Q: ... A: ..." for a qa document."""
    if doc.kind == "qa":
        return f"Q: {doc.question.strip()} A: {doc.answer.strip()}"
    return doc.text.strip()


# ---------------------------------------------------------------- deterministic fallbacks

_ABBREVIATION = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|e\.g|i\.e|No|Vol|Fig)|\b[A-Z])\.$")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_LIST_OR_HEADING = re.compile(r"^\s*(?:#{1,6}\s+|[-*+]\s+|\d+[.)]\s+|>\s*)")
_STOPWORDS = frozenset("""a an the this that these those his her its their our my your of in on at to for from by with
and or but is are was were be been being has have had do does did not no as it he she they we you i into onto
over under about after before than then there here which who whom whose what when where why how also very
will would can could may might must shall should just only so such some any all each every other more most
yes""".split())
_ENTITY = re.compile(r"[A-Z][\w'’-]*(?:\s+(?:(?:of|the|de|van|von|da|del|la|le)\s+)*[A-Z][\w'’-]*)*")
_NUMBER = re.compile(r"\b\d[\d,.:/-]*\d\b|\b\d\b")
_ACTIONS = {"wrote": "write", "founded": "found", "invented": "invent", "discovered": "discover",
            "created": "create", "painted": "paint", "built": "build", "composed": "compose",
            "directed": "direct", "designed": "design", "established": "establish", "published": "publish",
            "developed": "develop", "won": "win", "led": "lead", "married": "marry", "received": "receive",
            "owns": "own", "owned": "own", "named": "name", "translated": "translate"}
_DETERMINERS = frozenset("the a an this that these those his her its their our my your".split())
_AUXILIARY = re.compile(r" (?:is|are|was|were|has|have|had|be|been|being) ", re.I)
_IRREGULAR_PARTICIPLES = frozenset("""built written made known born given taken held sold won led found run seen
done drawn grown shown thrown chosen spoken stolen broken driven eaten fallen forgotten hidden ridden risen
shaken sung sunk swum torn worn woven begun bought brought caught fought taught thought sent spent lent meant
kept left lost paid said told understood""".split())
_PREPOSITIONS = frozenset("in on at by for from during since until into with".split())
_CLAUSE_BREAK = re.compile(r",|;| and | but | where | when | which | who ")


def _blocks(text):
    """Paragraphs with wrapped lines joined; headings and list items stand alone."""
    block = []
    for line in text.splitlines():
        stripped = line.strip()
        if _LIST_OR_HEADING.match(line) or not stripped:
            if block:
                yield " ".join(block)
            block = []
            if stripped:
                yield _LIST_OR_HEADING.sub("", line).strip()
        else:
            block.append(stripped)
    if block:
        yield " ".join(block)


def split_sentences(text):
    """Sentences of `text` (markdown-aware, abbreviation-aware), whitespace collapsed."""
    sentences = []
    for block in _blocks(text):
        pieces = _SENTENCE_END.split(" ".join(block.split()))
        merged = []
        for piece in pieces:
            if merged and _ABBREVIATION.search(merged[-1]):
                merged[-1] += " " + piece
            else:
                merged.append(piece)
        sentences += [s.strip() for s in merged if s.strip()]
    return sentences


def _blank_candidates(sentence):
    """Spans worth blanking, as (start, end): named entities and numbers, else the longest content word."""
    spans = []
    for match in _ENTITY.finditer(sentence):
        words = match.group().split()
        while words and words[0].lower() in _STOPWORDS:  # "The Pale Sea" -> "Pale Sea"; "In" -> nothing
            words.pop(0)
        if words:
            start = match.start() + match.group().index(words[0])
            spans.append((start, match.end()))
    spans += [m.span() for m in _NUMBER.finditer(sentence)]
    if not spans:
        words = [m for m in re.finditer(r"[A-Za-z][\w'’-]*", sentence) if m.group().lower() not in _STOPWORDS]
        if words:
            longest = max(words, key=lambda m: (len(m.group()), m.start()))
            spans.append(longest.span())
    return sorted(set(spans))


def _cloze_examples(sentence, max_blanks):
    # The last spans first: objects ("... is Quartzholm", "... in 1987") are what questions ask about.
    for start, end in _blank_candidates(sentence)[-max_blanks:]:
        blanked = f"{sentence[:start]}___{sentence[end:]}"
        yield f"Fill in the blank: {blanked}", sentence[start:end]


def _lower_determiner(phrase):
    first, _, rest = phrase.partition(" ")
    return f"{first.lower()} {rest}".strip() if first.lower() in _DETERMINERS else phrase


def _strip_end(sentence):
    return sentence.rstrip(" .!?;:")


def _template_qa(sentence):
    """(question, answer) pairs from simple sentence patterns; a generic question when none fits."""
    body = _strip_end(sentence)
    if len(body.split()) < 3 or body.endswith("?"):
        return []
    born = re.match(r"^(?P<x>.+?) (?:was|were) born (?:in|on) (?P<y>.+)$", body)
    if born:
        x, y = born["x"], _first_clause(born["y"])
        return [(f"{'When' if y[:1].isdigit() else 'Where'} was {_lower_determiner(x)} born?", y)]
    located = re.match(r"^(?P<x>.+?) (?P<verb>is|are|was|were) located in (?P<y>.+)$", body)
    if located:
        return [(f"Where {located['verb']} {_lower_determiner(located['x'])} located?", _first_clause(located["y"]))]
    by = re.match(r"^(?P<x>.+?) (?P<be>is|are|was|were) (?P<verb>\w+) by (?P<y>.+)$", body)
    if by and _is_participle(by["verb"]):
        return [(f"Who {by['be']} {_lower_determiner(by['x'])} {by['verb']} by?", _first_clause(by["y"]))]
    action = re.match(rf"^(?P<x>.+?) (?P<verb>{'|'.join(_ACTIONS)}) (?P<y>.+)$", body)
    if action and len(action["x"].split()) <= 6 and not _passive(action["x"], action["y"]):
        x, verb, y = action["x"], action["verb"], action["y"]
        return [(f"Who {verb} {_lower_determiner(y)}?", x),
                (f"What did {_lower_determiner(x)} {_ACTIONS[verb]}?", y)]
    copula = re.match(r"^(?P<x>.+?) (?P<verb>is|are|was|were) (?P<y>.+)$", body)
    if copula and len(copula["x"].split()) <= 8 and not _is_participle(copula["y"].split(" ", 1)[0]):
        return [(f"What {copula['verb']} {_lower_determiner(copula['x'])}?", copula["y"])]
    return [(f"What do you know about {_lower_determiner(_subject(sentence))}?", sentence)]


def _is_participle(word):
    word = word.lower()
    return word in _IRREGULAR_PARTICIPLES or word.endswith(("ed", "ing"))


def _passive(subject, rest):
    """ "a bridge built in 1902", "Quartzholm has a bridge built by ...": the verb is a participle."""
    return bool(_AUXILIARY.search(f" {subject} ")) or rest.split(" ", 1)[0].lower() in _PREPOSITIONS


def _first_clause(phrase):
    return _CLAUSE_BREAK.split(phrase, 1)[0].strip()


def _subject(sentence):
    """The first named entity, else the leading words up to the first function word ("The population")."""
    spans = _blank_candidates(sentence)
    entity = next((sentence[s:e] for s, e in spans if sentence[s:s + 1].isupper()), None)
    if entity:
        return entity
    words = _strip_end(sentence).split()
    subject = words[:1]
    for word in words[1:5]:
        if word.lower() in _STOPWORDS and word.lower() not in _DETERMINERS | {"of"}:
            break
        subject.append(word)
    return " ".join(subject)


# ---- wh-questions from the cloze blanks: the blank becomes a question word inside its own clause
# ("Northern Rail provides local and regional services." -> "Who provides local and regional services?")

_MONTHS = frozenset("January February March April May June July August September October November December".split())
_NUMBER_WORD = re.compile(r"\b(?:two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|"
                          r"forty|fifty|hundred|thousand|dozen)s?\b(?= (?!of\b|the\b|and\b|or\b)[a-z])", re.I)
_SPAN_GAP = re.compile(r"^\s*(?:and|to|–|—|-)?\s*(?:(?:early|mid|late)\s+)?$")
_NAME_GAP = re.compile(r"^(?:\. | (?:al|el|ibn|bin|abu|de|di|da|van|von|der)[ -])$")  # "Fielding H. Garrison"
_ERA = re.compile(r"^(?:CE|BC|BCE|AD)$")
_YEAR = re.compile(r"(?:1\d{3}|20\d{2}|\d{1,4}s)")
_APPROXIMATELY = re.compile(r"\b(?:about|around|approximately|nearly|almost|over|roughly|more than|less than|"
                            r"up to|early|mid|late) $", re.I)
_AGO = re.compile(r"^(?: (?:million|billion|thousand|hundred))? years? ago\b")
_WH_BREAK = re.compile(r"\s*(?:[,;:—]|\s[–-]\s)\s*")
_PARENTHETICAL = re.compile(r"\s*\([^()]*\)")
_POSSESSIVE = re.compile(r"['’]s?$")
_LIFESPAN = re.compile(r"^ \((?:[^()]*?, )?(\d{3,4}\s*[–-]\s*\d{3,4}(?:\s*(?:CE|BC|BCE|AD))?)\)")
_OPENERS = frozenset("since instead following although however while despite because though unlike".split())
_PAST = re.compile(r"\b(?:was|were|had|did|\w+ed)\b")
_PASSIVE_BY = re.compile(r"^(?P<x>.+?) (?:is|are|was|were|has been|have been|had been) (?:\w+ly )?(?P<verb>\w+ed)"
                         r"(?P<mid>(?: .*?)?) by (?P<y>.+)$")
_AGENT_TITLE = re.compile(r"^(?:(?:the|a|an|his|her|its|their) )?(?:[a-z][\w-]* ){0,3}$")


def _is_number(text):
    return bool(_NUMBER.search(text) or _NUMBER_WORD.search(f"{text} x"))


def _is_date(text):
    numbers = re.findall(r"\d[\d.]*s?", text)
    return bool(set(text.split()) & _MONTHS or re.search(r"\bago$|\b(?:CE|BC|BCE|AD)$", text)
                or (numbers and all(_YEAR.fullmatch(n) for n in numbers)))


def _joinable(sentence, a, b):
    """Spans a and b are one answer: "July 1961", "1702 and 1709", "973–1048 CE", "1961 and early 1962",
    "Fielding H. Garrison", "Abu al-Rayhan al-Biruni"."""
    first, second, gap = sentence[a[0]:a[1]], sentence[b[0]:b[1]], sentence[a[1]:b[0]]
    if _NAME_GAP.match(gap):
        return second[:1].isupper() and (gap != ". " or bool(re.search(r"\b[A-Z]$", first)))
    return bool(_SPAN_GAP.match(gap)) and _is_number(second) != bool(_ERA.match(second)) \
        and (_is_number(first) or first in _MONTHS)


def _answer_spans(sentence):
    """Blank candidates and number words; dates and ranges joined, "about"/"years ago" taken along."""
    merged = []
    for span in sorted(set(_blank_candidates(sentence)) | {m.span() for m in _NUMBER_WORD.finditer(sentence)}):
        if merged and _joinable(sentence, merged[-1], span):
            merged[-1] = (merged[-1][0], span[1])
        elif not merged or span[0] >= merged[-1][1]:
            merged.append(span)
    spans = []
    for start, end in merged:
        if _is_number(sentence[start:end]):
            ago, modifier = _AGO.match(sentence[end:]), _APPROXIMATELY.search(sentence[:start])
            start, end = (modifier.start() if modifier else start), end + (ago.end() if ago else 0)
        spans.append((start, end))
    return spans


def _clause_bounds(sentence, start, end, min_words=4):
    """(left, right) of the clause around sentence[start:end], widened by the clauses before (then
    after) it until at least `min_words` words lie outside the span."""
    breaks = [m.span() for m in _WH_BREAK.finditer(sentence) if m.end() <= start or m.start() >= end]
    lefts = [0] + [b for _, b in breaks if b <= start]
    rights = [a for a, _ in breaks if a >= end] + [len(sentence)]
    i, j = len(lefts) - 1, 0
    while len(f"{sentence[lefts[i]:start]} {sentence[end:rights[j]]}".split()) < min_words \
            and (i > 0 or j < len(rights) - 1):
        i, j = (i - 1, j) if i > 0 else (i, j + 1)
    return lefts[i], rights[j]


def _word_before(sentence, left, start):
    """(position, lowercase word) of the word right before `start` inside the clause; (start, "") if none."""
    match = re.search(r"([\w’'-]+) $", sentence[left:start])
    return (left + match.start(), match[1].lower()) if match else (start, "")


def _title_start(sentence, left, start):
    """Where a title in front of a name begins ("the Persian scholar Ibn Sina", "Train operator Virgin
    Trains"): back over content words to a determiner or the clause start; `start` when there is none."""
    position, words = start, 0
    while True:
        at, word = _word_before(sentence, left, position)
        if not word or (word in _STOPWORDS and word not in _DETERMINERS) or (words == 0 and word.endswith("ed")):
            return position if words and position == left else start
        if word in _DETERMINERS:
            return at if words else start
        position, words = at, words + 1
        if words > 4:
            return start


def _wh_words(sentence, left, right, start, end):
    """[(cut start, cut end, question word, to the front)]: the text the question word replaces."""
    answer = sentence[start:end]
    at, word = _word_before(sentence, left, start)
    if _is_date(answer):
        if word == "between":
            return [(start, end, "what years", False)]
        if word in ("in", "on", "during", "at"):  # "... in 1985" -> "When ...?"
            return [(at, end, "when", True)]
        return [(start, end, "when", not word)]  # "dates from 1702" -> "dates from when"
    if _is_number(answer):
        return [(start, end, "how many" if re.match(r" [a-z]", sentence[end:]) else "what", False)]
    start = _title_start(sentence, left, start)
    at, word = _word_before(sentence, left, start)
    if _POSSESSIVE.search(answer):
        return [(start, end, "whose", False)]
    if word in ("who", "whose", "which"):  # "..., whose Calvinist Great Elector Frederick William welcomed them"
        return [(at, end, "who", False)]
    if start == left and not re.match(r"\s*(?:,|and\b|or\b|$)", sentence[end:right]):
        return [(start, end, "who", False), (start, end, "what", False)]
    if word in ("in", "at"):
        return [(at, end, "where", False) if not sentence[end:right].strip()
                else (start, end, "what", False)]
    if word in ("to", "from", "into", "near", "towards"):
        return [(start, end, "where", False)]
    return [(at if word in ("the", "a", "an") else start, end, "whom" if word == "by" else "what", False)]


def _clean_clause(text):
    return re.sub(r"^(?:and|but|or|so) ", "", " ".join(text.split()).strip(" ,;:.—–-"), flags=re.I)


def _as_question(text):
    text = _clean_clause(text)
    return f"{text[:1].upper()}{text[1:]}?" if len(text.split()) >= 3 else ""


def _lifespan_qa(sentence):
    """ "Ibn Sina (Avicenna, 981–1037) proposed ..." -> who lived from 981–1037 / when did Ibn Sina live."""
    pairs = []
    for start, end in _answer_spans(sentence):
        years = _LIFESPAN.match(sentence[end:])
        if years and not _is_number(sentence[start:end]):
            name = sentence[start:end]
            pairs += [(f"Who lived from {years[1]}?", name), (f"When did {name} live?", years[1])]
    return pairs


def _appositive_qa(sentence):
    """ "..., including the newly hired deputy director of X, Joseph Shea, who ..." -> "Who was the
    newly hired deputy director of X?" / "Joseph Shea"."""
    pairs, verb = [], "was" if _PAST.search(sentence) else "is"
    for start, end in _blank_candidates(sentence):
        if sentence[start - 2:start] != ", " or not re.match(r"[,.]|$", sentence[end:]):
            continue
        before = _WH_BREAK.split(sentence[:start - 2])[-1]
        phrase = re.search(r"\b(?:the|a|an|his|her|its|their) .+$", before)
        if phrase and re.search(r"\b(?!of\b)[a-z]", phrase.group().split(" ", 1)[1]):  # not "the Netherlands"
            pairs.append((f"Who {verb} {phrase.group()}?", sentence[start:end]))
    return pairs


def _passive_agent_qa(text):
    """ "X was founded in 1931 by the cartographer Ilse Marrow" -> "Who founded X (in 1931)?" / "Ilse Marrow"
    (regular -ed participles only: their past tense is the same word)."""
    pairs = []
    for clause in _WH_BREAK.split(text):
        match = _PASSIVE_BY.match(clause)
        if not match or len(match["x"].split()) > 8:
            continue
        y = match["y"]
        agent = next(((s, e) for s, e in _answer_spans(y) if _AGENT_TITLE.match(y[:s]) and y[s:s + 1].isupper()), None)
        following = re.match(r" ([a-z][\w-]*)", y[agent[1]:]) if agent else None
        if agent is None or (following and following[1] not in _STOPWORDS):
            continue  # no name, or a name used as an adjective ("by the Muslim conquests")
        name, x = _POSSESSIVE.sub("", y[agent[0]:agent[1]]), _lower_determiner(_clean_clause(match["x"]))
        pairs += [(f"Who {match['verb']} {x}{mid}?", name) for mid in dict.fromkeys((match["mid"], ""))]
    return pairs


def _wh_questions(sentence):
    """(question, answer) pairs: each blank candidate (names, numbers, dates) asked for with who / what /
    whose / where / when / how many inside its clause (parentheticals dropped), plus appositive,
    lifespan and passive-agent questions."""
    text = _strip_end(_PARENTHETICAL.sub("", sentence))
    if len(text.split()) < 4:
        return []
    pairs = _lifespan_qa(sentence) + _appositive_qa(text) + _passive_agent_qa(text)
    spans = _answer_spans(text)
    for (start, end), following in zip(spans, spans[1:] + [(len(text), len(text))]):
        answer = _POSSESSIVE.sub("", text[start:end])
        if start == 0 and " " not in answer and (answer.lower() in _OPENERS or answer.endswith("ing")
                                                 or len(text[end:following[0]].split()) <= 1):
            continue  # "Since ...", "Drawing from ...", "Train operator Virgin Trains ...": no answer
        left, right = _clause_bounds(text, start, end)
        for cut, cut_end, wh, front in _wh_words(text, left, right, start, end):
            rest = f"{text[left:cut]} {'' if front else wh}{text[cut_end:right]}"
            question = _as_question(f"{wh} {_lower_determiner(_clean_clause(rest))}" if front else rest)
            if question and len(answer) > 1:
                pairs.append((question, answer))
    return pairs


def rephrase_question(question):
    """Deterministic rewordings of a question (the answer stays the same)."""
    q = " ".join(question.split())
    return [f"Please answer this question: {q}", f"Quick question: {q}", f"I'd like to know something. {q}"]


def fallback_examples(doc, max_blanks_per_sentence=2):
    """Deterministic examples from `doc` without any model.

    text document: "raw" (empty prompt, the whole text as target), per sentence "cloze" examples
    (an entity, number or content word replaced by ___) and "qa" from sentence templates ("X is Y."
    -> "What is X?" / "Y", "X wrote Y" -> "Who wrote Y?" / "X", else "What do you know about
    <subject>?" / the sentence), each template question also once reworded ("rephrase"), and "qa"
    wh-questions, one per blank candidate and question word, asked inside the blank's clause
    ("Northern Rail provides local and regional services." -> "Who provides local and regional
    services?" / "Northern Rail"; dates -> "When ...", numbers -> "how many").
    qa document: the question/answer pair and three rewordings of the question.
    """
    context = document_context(doc)
    pairs = []  # (prompt, target, kind)
    if doc.kind == "qa":
        if not (doc.question or "").strip() or not (doc.answer or "").strip():
            raise ValueError(f"qa document {doc.id} ({doc.source}) needs a question and an answer")
        answer = doc.answer.strip()
        pairs.append((doc.question.strip(), answer, "qa"))
        pairs += [(variant, answer, "rephrase") for variant in rephrase_question(doc.question)]
    else:
        if not doc.text.strip():
            raise ValueError(f"document {doc.id} ({doc.source}) has no text")
        pairs.append(("", doc.text.strip(), "raw"))
        for sentence in split_sentences(doc.text):
            if len(sentence.split()) < 3:
                continue
            pairs += [(p, t, "cloze") for p, t in _cloze_examples(sentence, max_blanks_per_sentence)]
            for question, answer in _template_qa(sentence):
                pairs.append((question, answer, "qa"))
                pairs.append((rephrase_question(question)[1], answer, "rephrase"))
            pairs += [(question, answer, "qa") for question, answer in _wh_questions(sentence)]
    return _examples(pairs, doc.id, context)


def _examples(pairs, doc_id, context):
    seen, examples = set(), []
    for prompt, target, kind in pairs:
        prompt, target = prompt.strip(), target.strip()
        if target and (prompt, target) not in seen:
            seen.add((prompt, target))
            examples.append(Example(prompt, target, kind, doc_id, context))
    return examples


# ---------------------------------------------------------------- generated examples

QA_INSTRUCTION = ("Text:\n{text}\n\nWrite {n} different questions that the text above answers, each followed by "
                  "its short answer taken from the text, in this form:\nQ: <question>\nA: <answer>")
REPHRASE_INSTRUCTION = ("Rewrite the text below in your own words. Keep every fact, name, number and date.\n\n"
                        "Text:\n{text}")

# "Q:"/"Question 2:"/"A:"/"Answer:" at a line start (after optional bullet or "1." numbering) or after a space
_MARKER = re.compile(r"(?:^[ \t>*-]*(?:\d{1,2}[.)][ \t]*)?|(?<=[ \t]))(?P<tag>Q|Question|A|Answer)[ \t]*\d*[ \t]*:",
                     re.I | re.M)
_PLACEHOLDER = re.compile(r"<\s*(?:question|answer)\s*>", re.I)
_GARBLED = re.compile(r"[\ufffd\x00-\x08\x0b-\x1f\x7f]")  # undecodable bytes, control characters


def _clean(text):
    return " ".join(text.split()).strip(" *_\"'`-")


def parse_qa_pairs(text):
    """(question, answer) pairs from model output in "Q: ... A: ..." form, one pair per line or Q and
    A on consecutive lines; tolerates numbering, "Question 1:"/"Answer:", markdown bold. Pairs with
    an empty, placeholder or garbled part, an over-long part or a repeated question are dropped."""
    text = text.replace("**", "").replace("__", "")
    markers = list(_MARKER.finditer(text))
    pairs, seen = [], set()
    for i, marker in enumerate(markers):
        following = markers[i + 1] if i + 1 < len(markers) else None
        if marker["tag"].lower() not in ("q", "question") or following is None \
                or following["tag"].lower() not in ("a", "answer"):
            continue
        question = _clean(text[marker.end():following.start()])
        answer_end = markers[i + 2].start() if i + 2 < len(markers) else len(text)
        answer = _clean(text[following.end():answer_end].strip().split("\n", 1)[0])
        both = question + " " + answer
        if not question or not answer or _PLACEHOLDER.search(both) or _GARBLED.search(both):
            continue
        if len(question) > 300 or len(answer) > 300 or question.lower() in seen:
            continue
        seen.add(question.lower())
        pairs.append((question, answer))
    return pairs


def parse_rephrasing(text, truncated=False):
    """The rewritten text from model output: a lead-in line ("Here is ...:") dropped, whitespace
    collapsed, cut back to the last full sentence when the output was truncated; "" if < 3 words
    or garbled (undecodable bytes, control characters)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if lines and lines[0].rstrip().endswith(":") and len(lines) > 1:
        lines = lines[1:]
    rewritten = " ".join(" ".join(lines).split())
    if truncated:
        end = max(rewritten.rfind(c) for c in ".!?")
        rewritten = rewritten[:end + 1] if end > 0 else rewritten
    return rewritten if len(rewritten.split()) >= 3 and not _GARBLED.search(rewritten) else ""


def _clip_tokens(tokenizer, text, max_tokens):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max(max_tokens, 1)])


def _content_words(text):
    return [w for w in re.findall(r"[\w'’]+", text.lower()) if w not in _STOPWORDS]


def grounding(answer, context):
    """Share of the answer's content words that occur in the context (1.0 when it has none)."""
    words = _content_words(answer)
    vocabulary = set(_content_words(context))
    return sum(w in vocabulary for w in words) / len(words) if words else 1.0


def _generated_examples(doc, qa_output, rephrase_output, n_questions, truncated=(False, False), min_grounding=0.5):
    # A weak generator (a small model studying itself) invents answers; writing those into memory
    # does harm, so answers mostly made of words absent from the document are dropped.
    context = document_context(doc)
    pairs = parse_qa_pairs(qa_output)
    if truncated[0] and pairs:
        pairs = pairs[:-1]  # the last pair may have been cut off mid-answer
    pairs = [(q, a) for q, a in pairs if grounding(a, context) >= min_grounding]
    entries = [(q, a, "self_qa") for q, a in pairs[:n_questions]]
    rephrasing = parse_rephrasing(rephrase_output, truncated[1])
    if rephrasing and rephrasing.lower() != " ".join(context.split()).lower():  # a copy adds nothing to "raw"
        entries.append(("", rephrasing, "self_rephrase"))
    return _examples(entries, doc.id, context)


@torch.no_grad()
def _generate(model, tokenizer, prompt, max_new_tokens, temperature, seed):
    """(decoded new text, whether generation stopped at max_new_tokens rather than at eos)."""
    device = next(model.parameters()).device
    text = format_prompt(tokenizer, prompt)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.9}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, **sampling)
    new = out[0, ids.shape[1]:]
    truncated = len(new) >= max_new_tokens and not (new == tokenizer.eos_token_id).any()
    return tokenizer.decode(new, skip_special_tokens=True), bool(truncated)


def self_study_examples(doc, model, tokenizer, *, n_questions=4, max_new_tokens=64, temperature=0.0, seed=0,
                        min_grounding=0.5):
    """Examples the model writes itself with the document in its prompt: up to `n_questions`
    "self_qa" pairs (one generation of n_questions * max_new_tokens tokens) and one "self_rephrase"
    (prompt "", target the rewritten document; at most as many tokens, cut back to its last full
    sentence). Greedy unless temperature > 0; the document is clipped to fit the model's context.
    Output that does not parse, answers with under `min_grounding` of their content words in the
    document and a rephrasing that only copies the document are dropped, so the list may be short
    or empty for a weak model."""
    if n_questions < 1 or max_new_tokens < 1:
        raise ValueError(f"n_questions and max_new_tokens must be positive, got {n_questions} and {max_new_tokens}")
    context = document_context(doc)
    qa_budget = n_questions * max_new_tokens
    document_tokens = len(tokenizer(context, add_special_tokens=False).input_ids)
    rephrase_budget = min(max(max_new_tokens, document_tokens + 16), qa_budget)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:  # keep instruction + document + answer inside the model's context
        context = _clip_tokens(tokenizer, context, max(limit - max(qa_budget, rephrase_budget) - 96, 16))
    was_training = model.training
    model.eval()
    try:
        qa_output, qa_cut = _generate(model, tokenizer, QA_INSTRUCTION.format(n=n_questions, text=context),
                                      qa_budget, temperature, seed)
        rephrase_output, rephrase_cut = _generate(model, tokenizer, REPHRASE_INSTRUCTION.format(text=context),
                                                  rephrase_budget, temperature, seed)
    finally:
        model.train(was_training)
    return _generated_examples(doc, qa_output, rephrase_output, n_questions, (qa_cut, rephrase_cut), min_grounding)


class ExternalGeneratorError(RuntimeError):
    """The external endpoint failed or answered something that is not a chat completion."""


def chat_completions_url(endpoint):
    """Full /v1/chat/completions URL from a base URL ("http://host:8000", ".../v1" or the full URL)."""
    if not endpoint or not re.match(r"^https?://", endpoint):
        raise ValueError(f"endpoint must be an http(s) URL, got {endpoint!r}")
    endpoint = endpoint.rstrip("/")
    if endpoint.endswith("/chat/completions"):
        return endpoint
    return f"{endpoint}/chat/completions" if endpoint.endswith("/v1") else f"{endpoint}/v1/chat/completions"


def _chat(url, model_name, prompt, api_key, timeout, max_tokens):
    """(reply text, whether it stopped at max_tokens) from one chat completion."""
    body = json.dumps({"model": model_name, "messages": [{"role": "user", "content": prompt}],
                       "temperature": 0, "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace")
        raise ExternalGeneratorError(f"{url}: HTTP {e.code} {e.reason}: {detail}") from e
    except (urllib.error.URLError, OSError) as e:
        raise ExternalGeneratorError(f"{url}: request failed: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExternalGeneratorError(f"{url}: response is not JSON: {e}") from e
    try:
        choice = payload["choices"][0]
        content = choice["message"]["content"] or ""
    except (KeyError, IndexError, TypeError) as e:
        raise ExternalGeneratorError(f"{url}: not a chat completion: {str(payload)[:300]}") from e
    return content, choice.get("finish_reason") == "length"


def external_examples(doc, endpoint, model_name, api_key=None, timeout=60, *, n_questions=4, max_tokens=512,
                      min_grounding=0.5):
    """self_study_examples through an OpenAI-compatible /v1/chat/completions endpoint (urllib,
    temperature 0). Raises ExternalGeneratorError when the endpoint fails."""
    if not model_name:
        raise ValueError("external generation needs a model name for the endpoint")
    url = chat_completions_url(endpoint)
    context = document_context(doc)
    qa_output, qa_cut = _chat(url, model_name, QA_INSTRUCTION.format(n=n_questions, text=context),
                              api_key, timeout, max_tokens)
    rephrase_output, rephrase_cut = _chat(url, model_name, REPHRASE_INSTRUCTION.format(text=context),
                                          api_key, timeout, max_tokens)
    return _generated_examples(doc, qa_output, rephrase_output, n_questions, (qa_cut, rephrase_cut), min_grounding)


# ---------------------------------------------------------------- what is already known

@torch.no_grad()
def target_losses(examples, model, tokenizer, *, batch_size=8, max_len=128):
    """Mean cross-entropy of each example's target tokens under `model` (memory included), encoded
    exactly as training encodes them (learn.encode); nan where truncation left no target token."""
    from .learn import IGNORE, encode, pad_batch, target_labels, target_token_losses  # learn imports this module
    encoded = [encode(tokenizer, e, max_len) for e in examples]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = [math.nan] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))  # similar lengths pad less
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[first:first + batch_size]]
            ids, mask = pad_batch([e.ids for e in batch], pad_id, device)
            token_loss = target_token_losses(model(input_ids=ids, attention_mask=mask).logits, batch, ids)
            n_targets = (target_labels(batch, ids)[:, 1:] != IGNORE).sum(1)
            per_example = token_loss.sum(1) / n_targets.clamp(min=1)
            for row, i in enumerate(order[first:first + batch_size]):
                losses[i] = per_example[row].item() if n_targets[row] > 0 else math.nan
    finally:
        model.train(was_training)
    return losses


def drop_known(examples, model, tokenizer, threshold, *, batch_size=8, max_len=128):
    """(kept examples in their order, number skipped): an example is skipped when the mean loss of
    its target tokens is already below `threshold`. threshold=inf skips all, -inf none."""
    if threshold is None or threshold == -math.inf or not examples:
        return list(examples), 0
    losses = target_losses(examples, model, tokenizer, batch_size=batch_size, max_len=max_len)
    kept = [e for e, loss in zip(examples, losses) if not loss < threshold]
    return kept, len(examples) - len(kept)
