"""A plain linear map with the model's initialisation."""

from __future__ import annotations

from torch import nn

ZERO_INIT = True  # feature: some component starts at zero (`zero_init = true`)


class Linear(nn.Linear):
    """A plain linear map with the model's initialisation."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bias: bool = False,
        zero_init: bool = False,  # if ZERO_INIT
    ) -> None:
        super().__init__(in_dim, out_dim, bias=bias)
        if ZERO_INIT:
            self.zero_init = zero_init

    def init_weights(self, std: float, out_std: float) -> None:
        if ZERO_INIT and self.zero_init:
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, mean=0.0, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
