"""Dreaming: deterministic fallback examples, self-study, an external endpoint, dropping known examples."""
import copy
import hashlib
import http.server
import json
import math
import threading

import pytest

from engram_kernels.integrations import add_memory_layers
from engram_kernels.trainer import dreaming
from engram_kernels.trainer.dreaming import (Example, ExternalGeneratorError, chat_completions_url, drop_known,
                                             external_examples, fallback_examples, format_prompt, parse_qa_pairs,
                                             parse_rephrasing, self_study_examples, split_sentences, target_losses)

try:
    from engram_kernels.trainer.ingest import Document
except ImportError:  # ingest.py not written yet: a stand-in with the contract's fields
    import dataclasses

    @dataclasses.dataclass
    class Document:
        id: str
        source: str
        kind: str
        text: str
        question: str = None
        answer: str = None


def make_doc(text="", kind="text", question=None, answer=None):
    digest = hashlib.sha256(f"{kind}{text}{question}{answer}".encode()).hexdigest()
    return Document(id=digest, source="notes.md", kind=kind, text=text, question=question, answer=answer)


FACTS = "The capital of Veloria is Quartzholm. Mira Dask wrote the novel Glass Harbors in 1987.\n" \
        "The river Ost flows north into the Pale Sea."


def pairs(examples, kind):
    return [(e.prompt, e.target) for e in examples if e.kind == kind]


def test_fallback_examples_from_text():
    doc = make_doc(FACTS)
    examples = fallback_examples(doc)
    assert examples == fallback_examples(doc)  # deterministic
    assert all(e.doc_id == doc.id and e.context == FACTS for e in examples)
    assert pairs(examples, "raw") == [("", FACTS)]
    cloze = pairs(examples, "cloze")
    assert ("Fill in the blank: The capital of Veloria is ___.", "Quartzholm") in cloze
    assert ("Fill in the blank: Mira Dask wrote the novel Glass Harbors in ___.", "1987") in cloze
    assert ("Fill in the blank: The river Ost flows north into the ___.", "Pale Sea") in cloze
    qa = pairs(examples, "qa")
    assert ("What is the capital of Veloria?", "Quartzholm") in qa
    assert ("Who wrote the novel Glass Harbors in 1987?", "Mira Dask") in qa
    assert ("What do you know about Ost?", "The river Ost flows north into the Pale Sea.") in qa
    assert ("Quick question: What is the capital of Veloria?", "Quartzholm") in pairs(examples, "rephrase")
    assert len({(e.prompt, e.target) for e in examples}) == len(examples)


@pytest.mark.parametrize("sentence, question, answer", [
    ("Dr. Ilse Varn was born in 1950 and studied tides.", "When was Dr. Ilse Varn born?", "1950"),
    ("Quartzholm is located in the northern hills.", "Where is Quartzholm located?", "the northern hills"),
    ("Glass Harbors was written by Mira Dask.", "Who was Glass Harbors written by?", "Mira Dask"),
    ("Quartzholm has a glass bridge built in 1902.", "What do you know about Quartzholm?",
     "Quartzholm has a glass bridge built in 1902."),
    ("The population is growing quickly.", "What do you know about the population?",
     "The population is growing quickly."),
])
def test_fallback_question_templates(sentence, question, answer):
    assert (question, answer) in pairs(fallback_examples(make_doc(sentence)), "qa")



@pytest.mark.parametrize("sentence, question, answer", [
    ("Northern Rail provides local and regional services.", "Who provides local and regional services?",
     "Northern Rail"),
    ("Northern Rail provides local and regional services.", "What provides local and regional services?",
     "Northern Rail"),
    ("Train operator Virgin Trains East Coast provides a half-hourly frequency of trains to London King's Cross.",
     "Who provides a half-hourly frequency of trains to London King's Cross?", "Virgin Trains East Coast"),
    ("Some scholars say that geology can be traced to Persia after the Muslim conquests.",
     "Some scholars say that geology can be traced to where after the Muslim conquests?", "Persia"),
    ("Richard Harbison's purely morphological analysis in 1985 concluded that the cydippids are not monophyletic.",
     "Whose purely morphological analysis in 1985 concluded that the cydippids are not monophyletic?",
     "Richard Harbison"),
    ("Richard Harbison's purely morphological analysis in 1985 concluded that the cydippids are not monophyletic.",
     "When Richard Harbison's purely morphological analysis concluded that the cydippids are not monophyletic?",
     "1985"),
    ("It took French troops years to destroy all the bands of Camisards, between 1702 and 1709.",
     "It took French troops years to destroy all the bands of Camisards, between what years?", "1702 and 1709"),
    ("The committee was headed by his special technical assistant Nicholas E. Golovin in July 1961.",
     "The committee was headed by whom in July 1961?", "Nicholas E. Golovin"),
    ("The committee was headed by his special technical assistant Nicholas E. Golovin in July 1961.",
     "When the committee was headed by his special technical assistant Nicholas E. Golovin?", "July 1961"),
    ("A molecular analysis in 2001, using 26 species, confirmed the result.",
     "A molecular analysis in 2001, using how many species?", "26"),
    ("The trains run hourly, with a journey time of about three hours.", "With a journey time of how many hours?",
     "about three"),
    ("Members joined, including the newly hired deputy director of the Office of Space Flight, Joseph Shea, "
     "who became a champion of LOR.", "Who was the newly hired deputy director of the Office of Space Flight?",
     "Joseph Shea"),
    ("In China, the polymath Shen Kuo (1031–1095) formulated a hypothesis for the process of land formation.",
     "Who formulated a hypothesis for the process of land formation?", "Shen Kuo"),
    ("In China, the polymath Shen Kuo (1031–1095) formulated a hypothesis for the process of land formation.",
     "When did Shen Kuo live?", "1031–1095"),
    ("Abu al-Rayhan al-Biruni (973–1048 CE) was one of the earliest Persian geologists.",
     "Who lived from 973–1048 CE?", "Abu al-Rayhan al-Biruni"),
    ("The oldest map dates from 1702 and shows the lost village of Oskarby.",
     "The oldest map dates from when and shows the lost village of Oskarby?", "1702"),
    ("The Engram Archive of Lake Vostrel was founded in 1931 by the cartographer Ilse Marrow.",
     "Who founded the Engram Archive of Lake Vostrel?", "Ilse Marrow"),
    ("The Engram Archive of Lake Vostrel was founded in 1931 by the cartographer Ilse Marrow.",
     "Who founded the Engram Archive of Lake Vostrel in 1931?", "Ilse Marrow"),
    ("The Engram Archive of Lake Vostrel was founded in 1931 by the cartographer Ilse Marrow.",
     "The Engram Archive of Lake Vostrel was founded in 1931 by whom?", "Ilse Marrow"),
    ("Huguenots fled to Prussia, whose Great Elector Frederick William welcomed them to rebuild his country.",
     "Who welcomed them to rebuild his country?", "Great Elector Frederick William"),
])
def test_fallback_wh_questions_from_cloze_blanks(sentence, question, answer):
    assert (question, answer) in pairs(fallback_examples(make_doc(sentence)), "qa")


def test_fallback_wh_questions_skip_openers_and_titles():
    qa = pairs(fallback_examples(make_doc("Since the war, Quartzholm trades glass with Veloria.\n"
                                          "Train operator Virgin Trains runs services to Leeds.")), "qa")
    assert not any(a in ("Since", "Train") for _, a in qa)
    assert ("Who trades glass with Veloria?", "Quartzholm") in qa
    assert ("Virgin Trains runs services to where?", "Leeds") not in qa  # the title stays with the name
    assert ("Train operator Virgin Trains runs services to where?", "Leeds") in qa
    assert all(q.endswith("?") and q[:1].isupper() for q, _ in qa)
    passive = pairs(fallback_examples(make_doc("The land was formed by erosion of the mountains.\n"
                                               "It was not destroyed by the Muslim conquests.")), "qa")
    assert not any(q.startswith("Who formed") or q.startswith("Who destroyed") for q, _ in passive)

def test_fallback_examples_from_a_qa_document():
    doc = make_doc("", kind="qa", question="Who wrote Glass Harbors?", answer="Mira Dask")
    examples = fallback_examples(doc)
    assert examples == fallback_examples(doc)
    assert all(e.context == "Q: Who wrote Glass Harbors? A: Mira Dask" and e.target == "Mira Dask" for e in examples)
    assert pairs(examples, "qa") == [("Who wrote Glass Harbors?", "Mira Dask")]
    rephrased = [p for p, _ in pairs(examples, "rephrase")]
    assert len(rephrased) == 3 and all("Who wrote Glass Harbors?" in p for p in rephrased)
    assert {e.kind for e in examples} == {"qa", "rephrase"}


def test_fallback_errors_and_example_checks():
    with pytest.raises(ValueError, match="has no text"):
        fallback_examples(make_doc("  \n"))
    with pytest.raises(ValueError, match="needs a question and an answer"):
        fallback_examples(make_doc("", kind="qa", question="Who?", answer=""))
    with pytest.raises(ValueError, match="unknown example kind"):
        Example("q", "a", "summary", "d", "c")
    with pytest.raises(ValueError, match="empty target"):
        Example("q", " ", "qa", "d", "c")


def test_split_sentences_handles_markdown_and_abbreviations():
    text = "# Notes\n\nDr. Ilse Varn studied tides in\nthe Pale Sea. She was born in 1950.\n- Item one is here\n"
    assert split_sentences(text) == ["Notes", "Dr. Ilse Varn studied tides in the Pale Sea.",
                                     "She was born in 1950.", "Item one is here"]


def test_format_prompt_plain_and_chat(tokenizer):
    assert format_prompt(tokenizer, "Who wrote Glass Harbors?") == "Who wrote Glass Harbors?\n"
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert format_prompt(chat, "Hi?") == "<user>Hi?\n<assistant>"
    assert format_prompt(chat, "Hi?", system="Be brief.") == "<system>Be brief.\n<user>Hi?\n<assistant>"


def test_parse_qa_pairs_on_canned_output():
    output = ("Sure! Here are the questions:\n"
              "1. Q: What is the capital of Veloria? A: Quartzholm.\n"
              "2. **Q:** Who wrote Glass Harbors?\n**A:** Mira Dask\n"
              "Question 3: When was it written? Answer: In 1987\n\n"
              "Q: What was built? A: A bridge built in 1902.\n"
              "Q: <question> A: <answer>\n"
              "Q: What is the capital of Veloria? A: Quartzholm again\n"
              "Q: a question with no answer\n"
              "Q: Empty answer? A:   \n"
              "Q: Garbled? A: \ufffd\ufffd\n")
    assert parse_qa_pairs(output) == [("What is the capital of Veloria?", "Quartzholm."),
                                      ("Who wrote Glass Harbors?", "Mira Dask"),
                                      ("When was it written?", "In 1987"),
                                      ("What was built?", "A bridge built in 1902.")]
    assert parse_qa_pairs("") == [] and parse_qa_pairs("no pairs here at all") == []


def test_parse_rephrasing_on_canned_output():
    assert parse_rephrasing("Here is the rewritten text:\nQuartzholm is the capital\nof Veloria.") \
        == "Quartzholm is the capital of Veloria."
    assert parse_rephrasing("Quartzholm is the capital. Mira Dask wro", truncated=True) == "Quartzholm is the capital."
    assert parse_rephrasing("Too short") == ""
    assert parse_rephrasing("zhe01 fe\ufffd zhe01 fe zhe01") == ""


def test_generated_examples_drop_a_truncated_last_pair():
    doc = make_doc(FACTS)
    output = "Q: What is the capital of Veloria? A: Quartzholm\nQ: Who wrote Glass Harbors? A: Mira"
    examples = dreaming._generated_examples(doc, output, "Quartzholm is the capital of Veloria.", 4, (True, False))
    assert [(e.kind, e.prompt, e.target) for e in examples] == [
        ("self_qa", "What is the capital of Veloria?", "Quartzholm"),
        ("self_rephrase", "", "Quartzholm is the capital of Veloria.")]
    assert all(e.context == FACTS for e in examples)
    assert len(dreaming._generated_examples(doc, output, "", 1, (False, False))) == 1  # at most n_questions


def test_generated_examples_drop_invented_answers_and_copies():
    doc = make_doc(FACTS)
    output = ("Q: What is the capital of Veloria? A: Quartzholm is a city in the Caribbean islands.\n"
              "Q: When was Glass Harbors written? A: In 1987\n"
              "Q: Is it nice? A: Yes")
    examples = dreaming._generated_examples(doc, output, FACTS.lower(), 4)
    assert [(e.prompt, e.target) for e in examples] == [("When was Glass Harbors written?", "In 1987"),
                                                        ("Is it nice?", "Yes")]
    assert dreaming.grounding("Quartzholm, in 1987", FACTS) == 1.0
    assert dreaming.grounding("the Caribbean", FACTS) == 0.0


@pytest.fixture
def memory_model(tiny_model):
    return add_memory_layers(tiny_model, heads=2, k=4, n_keys=16, key_dim=32)


def test_self_study_with_a_tiny_random_model(memory_model, tokenizer):
    training = memory_model.training
    doc = make_doc("The capital of Veloria is Quartzholm.")
    examples = self_study_examples(doc, memory_model, tokenizer, n_questions=2, max_new_tokens=8)
    assert isinstance(examples, list)
    assert all(e.kind in ("self_qa", "self_rephrase") and e.target.strip() for e in examples)
    assert memory_model.training == training


class _StubChat(http.server.BaseHTTPRequestHandler):
    """Answers chat completions: Q/A lines or a rephrasing, depending on the instruction."""
    requests = []
    fail = False

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, self.headers.get("Authorization"), body))
        if type(self).fail:
            self.send_error(500, "model overloaded")
            return
        prompt = body["messages"][-1]["content"]
        content = ("Q: What is the capital of Veloria? A: Quartzholm\nQ: Who wrote Glass Harbors? A: Mira Dask"
                   if "questions" in prompt else "Quartzholm is the capital of Veloria.")
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                         "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_endpoint():
    _StubChat.requests, _StubChat.fail = [], False
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubChat)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_external_examples_through_a_stub_endpoint(stub_endpoint):
    doc = make_doc(FACTS)
    examples = external_examples(doc, stub_endpoint, "stub-model", api_key="secret", timeout=5)
    assert [(e.kind, e.prompt, e.target) for e in examples] == [
        ("self_qa", "What is the capital of Veloria?", "Quartzholm"),
        ("self_qa", "Who wrote Glass Harbors?", "Mira Dask"),
        ("self_rephrase", "", "Quartzholm is the capital of Veloria.")]
    assert all(e.context == FACTS and e.doc_id == doc.id for e in examples)
    assert len(_StubChat.requests) == 2
    for path, auth, body in _StubChat.requests:
        assert path == "/v1/chat/completions" and auth == "Bearer secret"
        assert body["model"] == "stub-model" and body["temperature"] == 0
        assert FACTS in body["messages"][0]["content"]


def test_external_endpoint_errors_are_clear(stub_endpoint):
    _StubChat.fail = True
    with pytest.raises(ExternalGeneratorError, match="HTTP 500"):
        external_examples(make_doc(FACTS), stub_endpoint + "/v1", "stub-model", timeout=5)
    with pytest.raises(ValueError, match="http"):
        external_examples(make_doc(FACTS), "localhost:1234", "stub-model")


def test_chat_completions_url():
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("https://h/v1/chat/completions") == "https://h/v1/chat/completions"


def test_drop_known_thresholds(memory_model, tokenizer):
    examples = fallback_examples(make_doc(FACTS))
    kept, skipped = drop_known(examples, memory_model, tokenizer, math.inf)
    assert (kept, skipped) == ([], len(examples))
    kept, skipped = drop_known(examples, memory_model, tokenizer, -math.inf)
    assert (kept, skipped) == (examples, 0)
    losses = target_losses(examples, memory_model, tokenizer, batch_size=3)
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    middle = sorted(losses)[len(losses) // 2]
    kept, skipped = drop_known(examples, memory_model, tokenizer, middle)
    assert kept == [e for e, loss in zip(examples, losses) if loss >= middle]  # order kept
    assert skipped == sum(loss < middle for loss in losses)
    one_by_one = [target_losses([e], memory_model, tokenizer)[0] for e in examples[:3]]
    assert one_by_one == pytest.approx(losses[:3], rel=1e-4, abs=1e-5)  # padding does not change a loss
