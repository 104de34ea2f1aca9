"""Quantization algorithms, one file each, registered by name for recipes.

Importing this package registers every built-in algorithm.
"""

from __future__ import annotations

from lowbit.algorithms import adaround as adaround  # registers "adaround"
from lowbit.algorithms import awq as awq  # registers "awq"
from lowbit.algorithms import gptq, rtn
from lowbit.algorithms import osplus as osplus  # registers "osplus"
from lowbit.algorithms import signround as signround  # registers "signround"
from lowbit.algorithms import smoothquant as smoothquant  # registers "smoothquant"
from lowbit.algorithms import zeroquant as zeroquant  # registers "zeroquant"
from lowbit.algorithms.base import ALGORITHMS, Algorithm, BlockContext, build_algorithm, register

__all__ = ["ALGORITHMS", "Algorithm", "BlockContext", "build_algorithm", "gptq", "register", "rtn"]
