"""Settings and helpers shared by the whole suite: one tiny-model factory and one fixture text.

Test modules import the helpers directly (`from conftest import TEXT, tiny_model`): pytest puts tests/ on sys.path.
"""

from __future__ import annotations

import pytest
import torch

from spikedecoder import SpikeDecoder, SpikeDecoderConfig

PARAGRAPH = (
    "When the evening light fell across the harbour, the old keeper climbed the stair and lit the lamp. "
    "Ships came home slowly, one by one, and the water was calm and grey.\n"
)
TEXT = PARAGRAPH * 20  # 3.4k characters: a small, learnable text
TINY_SIZES = dict(vocab_size=20, max_len=16, n_layer=2, n_head=2, n_embd=32)


# The preset's graded spikes (up to 4 per neuron) where a test asks for a spiking residual stream, which needs binary
# spikes (residual 1 and 2 sum or multiply them as bits): the binary model those modes are defined on.
BINARY_SPIKES = dict(spike_levels=1, qkv_levels=1)


def preset_config(preset: str = "spikedecoder", **values) -> SpikeDecoderConfig:
    """SpikeDecoderConfig.from_preset, where a spiking residual stream (residual 1 or 2) gets binary spikes unless
    the test says otherwise."""
    if values.get("residual", 0):
        values = BINARY_SPIKES | values
    return SpikeDecoderConfig.from_preset(preset, **values)


def tiny_config(preset: str = "spikedecoder", **values) -> SpikeDecoderConfig:
    """A preset at test sizes (TINY_SIZES); any size or setting can be overridden (residual: see preset_config)."""
    return preset_config(preset, **(TINY_SIZES | values))


def tiny_model(preset: str = "spikedecoder", seed: int = 0, warm_norms: bool = False, **values) -> SpikeDecoder:
    """A tiny random model (seeded) in eval mode. warm_norms: BatchNorm/PowerNorm first get running statistics from
    three training forwards on random ids, as a trained model's would be."""
    torch.manual_seed(seed)
    model = SpikeDecoder(tiny_config(preset, **values))
    cfg = model.config
    if warm_norms and cfg.norm in ("batch", "power"):
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randint(0, cfg.vocab_size, (4, cfg.max_len)))
    return model.eval()


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """Test models are tiny: one thread is fastest for them, and on a busy machine several threads per process
    contend for the cores and run several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
