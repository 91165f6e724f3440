"""A plain `nn.Module` that returns logits, made a `FeatureNet`: its features are the layers a config names
(`student.features: [layer2, layer3, avgpool]`), read by forward hooks, so FitNets, LSH and TCS distil it like a zoo
network. "penultimate" is the last named feature, flattened; the classifier is the final `nn.Linear` that maps it to
the logits, found (and checked) by one probe forward when the network is built."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from methods.networks import FeatureNet


class HookedNet(FeatureNet):
    def __init__(self, net: nn.Module, features: list[str], input_shape: tuple[int, int, int]) -> None:
        super().__init__(0)
        self.net = net
        layers = dict(net.named_modules())
        for name in features:
            if name not in layers or name == "":
                shown = ", ".join(n for n in list(layers)[1:13] if n)
                raise ValueError(f"features: '{name}' is not a layer of {type(net).__name__}; its layers include "
                                 f"{shown}")
        if len(set(features)) != len(features):
            raise ValueError(f"features: each layer once (got {features})")
        self._stage_names = list(features)
        self._dim: int | None = None
        self._classifier: str | None = None
        self._probe(input_shape)

    @torch.no_grad()
    def _probe(self, input_shape: tuple[int, int, int]) -> None:
        was_training = self.training
        self.eval()
        try:
            logits, feats = self(torch.randn(2, *input_shape), features=True)
        except Exception as err:  # a user's network may raise anything on the data's shape
            raise ValueError(f"{type(self.net).__name__} fails on inputs of shape {input_shape}: "
                             f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
                             ) from None
        finally:
            self.train(was_training)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ValueError(f"{type(self.net).__name__} must return logits of shape (batch, classes)")
        if "penultimate" not in feats:
            return
        width = feats["penultimate"].shape[1]
        self._dim = width
        for name, layer in reversed(list(self.net.named_modules())):
            if isinstance(layer, nn.Linear) and layer.in_features == width and layer.out_features == logits.shape[1]:
                if torch.allclose(layer(feats["penultimate"]), logits, atol=1e-4, rtol=1e-4):
                    self._classifier = name
                break

    @property
    def feature_dim(self) -> int:
        if self._dim is None:
            raise ValueError(f"{type(self.net).__name__} names no features; name its layers in student.features or "
                             "teacher.features (the last one is the penultimate)")
        return self._dim

    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        if self._classifier is None:
            raise ValueError(f"{type(self.net).__name__}: no final nn.Linear maps its last named feature "
                             f"({(self._stage_names or ['none'])[-1]}) to the logits; name the layer feeding it last")
        layer = self.net.get_submodule(self._classifier)
        assert isinstance(layer, nn.Linear)
        return layer

    def stage_module(self, name: str) -> nn.Module:
        return self.net.get_submodule(name)

    def forward(self, x: Tensor, features: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        if not features:
            return self.net(x)
        feats: dict[str, Tensor] = {}

        def keep(name: str):  # noqa: ANN202
            def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
                feats[name] = output

            return hook

        handles = [self.net.get_submodule(name).register_forward_hook(keep(name)) for name in self._stage_names]
        try:
            logits = self.net(x)
        finally:
            for handle in handles:
                handle.remove()
        if self._stage_names:
            feats["penultimate"] = torch.flatten(feats[self._stage_names[-1]], 1)
        return logits, feats
