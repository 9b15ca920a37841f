"""Puts tests/fault_runner.py's FaultInjectingRunner into a real TorchServe worker.

A test that starts a service with this folder on PYTHONPATH and
WHISPER_TEST_OOM_ABOVE_WINDOWS=N gets workers whose engine runs its ModelRunner wrapped
in a FaultInjectingRunner(N): Python imports this module at start-up, and it wraps
`engine.model_runner` as soon as the handler imports `engine`. Nothing of it is in the
handler or the archive.
"""

import importlib.abc
import importlib.machinery
import os
import sys

LIMIT = int(os.environ.get("WHISPER_TEST_OOM_ABOVE_WINDOWS") or 0)


class _WrapEngineRunner(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "engine":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            from fault_runner import FaultInjectingRunner

            make = module.model_runner
            module.model_runner = lambda model, config: FaultInjectingRunner(make(model, config), LIMIT)

        spec.loader.exec_module = exec_module
        return spec


if LIMIT:
    sys.meta_path.insert(0, _WrapEngineRunner())
