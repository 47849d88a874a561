"""Data sets in their released layouts (Weizmann Horse, CAMUS), apart from the generic readers."""

from __future__ import annotations
