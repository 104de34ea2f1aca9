"""The lab: methods compared side by side on one model (``lowbit compare``), with stored results,
plots and a self-contained HTML report.

>>> from lowbit import lab
>>> results = lab.compare("demo", presets=["w4a16-rtn", "w4a16"], out="cmp")   # cmp/report.html, ...

The quantize and evaluate jobs run in this process or, with ``ray=`` (``"local"`` or an address),
as Ray tasks (``pip install 'lowbit[ray]'``); the results are the same.
"""

from __future__ import annotations

from lowbit.lab.sweep import compare

__all__ = ["compare"]
