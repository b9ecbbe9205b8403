"""Train an embedding model and report DML metrics on unseen classes (see `dmljax.train.cli`).

    python -m experiments.train                                  # standard Omniglot protocol, CPU
    python -m experiments.train --config omniglot_small          # minimal protocol (fast)
    python -m experiments.train --set optim.num_steps=500 --set loss.name=proxy_anchor
    python -m experiments.train --resume                         # continue from the latest checkpoint

The same command as the installed ``dmljax-train``; from Python:
``dmljax.train.train_and_evaluate(dmljax.configs.get_config("omniglot"), "runs/omniglot")``.
"""

from dmljax.train.cli import main

if __name__ == "__main__":
    main()
