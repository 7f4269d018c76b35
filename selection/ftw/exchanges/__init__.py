"""FTW's exchanges, one strategy per ``FTWConfig.exchange`` behind :class:`Exchange`: ``direction``
(direction.py), ``factors`` (factors.py), ``sketches`` (sketches.py)."""

from optsel.selection.ftw.exchanges.base import Exchange
from optsel.selection.ftw.exchanges.direction import DirectionCache, DirectionExchange
from optsel.selection.ftw.exchanges.factors import FactorExchange
from optsel.selection.ftw.exchanges.sketches import SketchExchange, SketchTarget

__all__ = ["DirectionCache", "DirectionExchange", "Exchange", "FactorExchange", "SketchExchange", "SketchTarget"]
