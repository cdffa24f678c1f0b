"""Configs: stdlib dataclasses loaded from YAML plus dotted overrides (``loader``) and the schema of
``reopold train`` (``schema``). Neither imports torch."""
