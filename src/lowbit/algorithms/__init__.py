"""Quantization algorithms, one file each, registered by name for recipes.

Importing this package registers every built-in algorithm.
"""

from __future__ import annotations

from lowbit.algorithms import adaround as adaround  # registers "adaround"
from lowbit.algorithms import awq as awq  # registers "awq"
from lowbit.algorithms import bcq as bcq  # registers "bcq", "bcq_aware"
from lowbit.algorithms import gptq, rtn
from lowbit.algorithms import mofq as mofq  # registers "mofq"
from lowbit.algorithms import olive as olive  # registers "olive"
from lowbit.algorithms import osplus as osplus  # registers "osplus"
from lowbit.algorithms import rptq as rptq  # registers "rptq"
from lowbit.algorithms import signround as signround  # registers "signround"
from lowbit.algorithms import smoothquant as smoothquant  # registers "smoothquant"
from lowbit.algorithms import zeroquant as zeroquant  # registers "zeroquant"
from lowbit.algorithms import zqfp as zqfp  # registers "zqfp" and "lorc"
from lowbit.algorithms.base import ALGORITHMS, Algorithm, BlockContext, build_algorithm, register

__all__ = ["ALGORITHMS", "Algorithm", "BlockContext", "build_algorithm", "gptq", "register", "rtn"]
