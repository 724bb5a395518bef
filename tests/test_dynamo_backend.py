"""torch.compile(model, backend="pdcompile") through the torch_dynamo_backends entry point."""

import pytest
import torch

import models


def test_entry_point_registered():
    assert "pdcompile" in torch._dynamo.list_backends()


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_torch_compile_matches_eager(backend):
    torch._dynamo.reset()
    model = models.build("qwen2")
    ids = torch.randint(3, models.VOCAB, (2, 9))
    ref = model(ids).logits
    compiled = torch.compile(model, backend="pdcompile", options={"backend": backend})
    torch.testing.assert_close(compiled(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_bad_option():
    torch._dynamo.reset()
    model = models.build("llama")
    compiled = torch.compile(model, backend="pdcompile", options={"backend": "nope"})
    with pytest.raises(Exception, match="backend='inductor' or 'eager'"):
        compiled(torch.randint(3, 100, (1, 4)))
