"""Integrations with other frameworks. Each submodule is imported on its own (``visionpeft.integrations.mmseg``
needs the ``mmseg`` extra); importing this package imports none of them.
"""
