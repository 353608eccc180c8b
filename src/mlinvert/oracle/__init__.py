"""Oracles: how an attack reaches a model (in process, over HTTP, wrapped)."""

from mlinvert.core import OracleInfo, Response
from mlinvert.oracle.base import GradientOracle, Oracle
from mlinvert.oracle.http import HttpOracle
from mlinvert.oracle.local import LocalOracle, WhiteBoxOracle

__all__ = [
    "GradientOracle",
    "HttpOracle",
    "LocalOracle",
    "Oracle",
    "OracleInfo",
    "Response",
    "WhiteBoxOracle",
]
