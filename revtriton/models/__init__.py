"""Reference models: the RevNet paper's CIFAR networks, their ResNet twins, a reversible
transformer and a reversible encoder-decoder. Every reversible model takes ``reversible=False``
for its eager twin."""
from .resnet import resnet32, resnet110, resnet164, revnet38, revnet110, revnet164
from .transformer import EncoderDecoder, reversible_transformer

__all__ = ["resnet32", "resnet110", "resnet164", "revnet38", "revnet110", "revnet164", "reversible_transformer",
           "EncoderDecoder"]
