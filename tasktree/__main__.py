"""The `tasktree` command: `python -m tasktree`, and the console script.

A command loads some hundred thousand objects and then, most often, runs for a fraction of a
second. The collector stays off while they load, and they are frozen out of its sight after
(`gc.freeze`): no collection walks them again, which took a tenth of `submit --no-wait`."""

import gc


def main() -> None:
    gc.disable()
    from tasktree.cli import run

    gc.freeze()
    gc.enable()
    run()


if __name__ == "__main__":
    main()
