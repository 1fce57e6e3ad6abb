"""Every exit is an exit: nothing keeps a finished run's frames (and so its loaders) alive."""

from __future__ import annotations

import gc
import weakref

from utils.observe.progress import save_curves


def test_drawing_the_curves_leaves_no_frame_of_its_callers_alive(tmp_path):
    """matplotlib's tick labels on the log axis go through its mathtext parser, which leaves
    reference cycles holding tracebacks, and so every frame that called it: a run's main()
    with its engine and loaders, until some later garbage collection (perhaps at exit)."""
    from matplotlib.mathtext import MathTextParser

    rows = [{"type": "train", "step": s, "loss": 6.0 - s / 10} for s in range(1, 5)]
    rows += [{"type": "eval", "step": s, "eval_perplexity": 350.0 - 30 * s} for s in (0, 4)]

    class Held:  # stands for what main()'s frame holds
        pass

    def caller() -> weakref.ref:
        held = Held()
        assert save_curves(rows, str(tmp_path / "training_curves.png"))
        return weakref.ref(held)

    MathTextParser._parse_cached.cache_clear()  # parse the labels again, as a new run does
    gc.disable()  # no automatic collection may hide what save_curves leaves behind
    try:
        held = caller()
        assert held() is None
    finally:
        gc.enable()
