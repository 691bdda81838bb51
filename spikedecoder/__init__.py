"""SpikeDecoder: directly trained spiking GPT language models, their ANN twins, and measured energy per token."""

from .config import ConfigError, SpikeDecoderConfig
from .model import SpikeDecoder

__all__ = ["ConfigError", "SpikeDecoder", "SpikeDecoderConfig"]
__version__ = "0.1.0"
