"""Reference MainNet architectures: the CIFAR-style ResNets of He et al. (2016).

``from sidenet.models import cifar_resnet`` gives the constructor function. The submodule of the same
name stays importable as ``from sidenet.models.cifar_resnet import ...``; note that the attribute
``sidenet.models.cifar_resnet`` (and so ``import sidenet.models.cifar_resnet as m``) is the function.
"""

from sidenet.models.cifar_resnet import CIFAR_RESNET_DEPTHS, CifarResNet, cifar_resnet

__all__ = ["CIFAR_RESNET_DEPTHS", "CifarResNet", "cifar_resnet"]
