"""The eager twin of a custom op: an autograd.Function with the same forward, setup and gradient.

Eager calls take it instead of the torch.library op, whose dispatcher costs tens of microseconds
per call (as much as a whole GPU kernel); torch.compile traces the op itself.
"""
import torch


def eager_function(name, forward, setup_context, grad, backward_impl):
    """An autograd.Function running forward(*inputs), then setup_context(ctx, inputs, output)
    (the ctx-in-forward style: a third of separate setup_context's call overhead), and whose
    backward is grad(ctx, *grad_outputs, backward_impl)."""

    def run_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def run_backward(ctx, *grad_outputs):
        return grad(ctx, *grad_outputs, backward_impl)

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(run_forward), "backward": staticmethod(run_backward)})


def traced():
    """Whether torch.compile is tracing (then the torch.library op runs, not the eager twin)."""
    return torch.compiler.is_compiling()


def values_checked(check_values):
    """Value checks (NaN, id ranges) read the data: a device sync, and no graph under torch.compile,
    so they are skipped while tracing."""
    return check_values and not traced()
