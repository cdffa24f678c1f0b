"""REOPOLD inside other training frameworks: ``reopold.integrations.trl`` (TRL) and ``reopold.integrations.verl``.

Each module imports its framework and is imported only on request; ``import reopold`` pulls in neither. The math
stays in ``reopold.core``: these modules only adapt each framework's inputs and outputs (docs/integrations.md).
"""
