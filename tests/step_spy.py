"""Watch what a runner computes, step by step, as the engine drives it (dispatch now, results
read later with host/device overlap): `on_result(plan, result)` is called when the engine reads
each step's result, in plan order."""
from __future__ import annotations


def watch_results(runner, on_result, on_dispatch=None) -> None:
    dispatch = runner.dispatch

    def spy(plan, features):
        if on_dispatch is not None:
            on_dispatch(plan)
        pending = dispatch(plan, features)
        read = pending.result

        def result():
            res = read()
            on_result(plan, res)
            return res

        pending.result = result
        return pending

    runner.dispatch = spy
