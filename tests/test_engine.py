import pytest
import torch

from llmq import arch
from llmq.engine import layer_output, run_layers
from conftest import random_ids, tiny_model


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3", "opt", "phi3"])
def test_unquantized_pass_equals_model_forward(name):
    model = tiny_model(name)
    ids = random_ids(n=3, length=16)
    _, layers = arch.decoder_layers(model)
    seen = {}
    hook = layers[-1].register_forward_hook(lambda m, a, out: seen.setdefault("out", layer_output(out)))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    hook.remove()
    calls = []

    def plain(i, layer, hidden, args, kwargs):
        calls.append(i)
        return layer_output(layer(hidden, *args, **kwargs)), ""

    out = run_layers(model, ids, plain, device=torch.device("cpu"), progress=False)
    assert calls == list(range(len(layers)))
    assert torch.equal(out, seen["out"])
    # The model is left as it was: its layers are the original modules again.
    assert all(type(layer).__name__ != "_Recorder" for layer in layers)


def test_gemma3_layers_get_their_own_masks():
    # Sliding-window and full-attention layers receive different masks; a driver that
    # reused layer 0's kwargs for every layer would diverge from the model's forward.
    from llmq.engine import capture_layer_inputs

    model = tiny_model("gemma3")
    ids = random_ids(n=1, length=16)
    _, per_layer = capture_layer_inputs(model, ids)
    masks = [kw.get("attention_mask") for _, kw in per_layer]
    pos = [kw.get("position_embeddings") for _, kw in per_layer]
    assert masks[0] is not masks[1] or pos[0] is not pos[1]


def test_activations_kept_on_host_give_the_same_output(monkeypatch):
    model = tiny_model("llama")
    ids = random_ids(n=2, length=8)

    def plain(i, layer, hidden, args, kwargs):
        return layer_output(layer(hidden, *args, **kwargs)), ""

    on_device = run_layers(model, ids, plain, device=torch.device("cpu"), progress=False, keep_on_device=True)
    on_host = run_layers(model, ids, plain, device=torch.device("cpu"), progress=False, keep_on_device=False)
    assert torch.equal(on_device, on_host)
    from llmq import engine

    assert engine.activations_fit(torch.zeros(4, 4), torch.device("cpu"))
