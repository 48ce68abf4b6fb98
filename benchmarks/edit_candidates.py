"""Which estimated candidates, at which strengths, the edit should use: measured on the *validation* split (clean
training-pool images held out of training, with the real trigger), never on the test split.

For every seed: estimate the trigger and target from ``--budget`` unseen images per class (the defaults of
TriggerEstimator), then edit a copy of the model with each combination of the flagged class's candidates and print
validation CA / ASR / TA. A combination is ``names@strengths``: ``neural_cleanse+perturbation+feature@1``,
``all@1,1.5`` (``all``: every estimator's candidate), ``flagging@1,1.5`` (the estimators that flag the class), or
``default`` (what the edit uses: the flagging candidates at the default strengths, patch candidates also moved).

    python benchmarks/edit_candidates.py --run blended --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch

from lightning_backdoor.data.poisoning import to_float
from lightning_backdoor.defenses import ActivationEditing, BackdoorKnowledge, UnseenData
from lightning_backdoor.defenses.estimation import BackdoorEstimate, TriggerEstimator
from lightning_backdoor.evaluation import evaluate
from lightning_backdoor.runs import instantiate_run

COMBINATIONS = ("default", "flagging@1,1.5", "all@1,1.5")


def triggers_of(combination: str, estimate: BackdoorEstimate) -> list:
    """The triggers a ``names@strengths`` combination names, from the flagged class's candidates (``flagging``: the
    estimators that flag the class; ``all``: every estimator's), none moved; ``default``: the edit's own triggers."""
    if combination == "default":
        return estimate.edit_triggers()
    names, _, strengths = combination.partition("@")
    candidates = estimate.every_candidate
    chosen = {"all": list(candidates), "flagging": list(estimate.candidates)}.get(names) or names.split("+")
    return [candidates[name].strengthened(float(strength)) for name in chosen
            for strength in (strengths or "1").split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="blended", help="runs/cifar10-<run>, trained by train_cifar10.sh")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=10, help="unseen images per class")
    parser.add_argument("--combinations", nargs="+", default=list(COMBINATIONS))
    parser.add_argument("--layer", default="blocks.2.conv2")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = ["configs/cifar10/base.yaml", f"configs/cifar10/{args.run}.yaml"]
    module, data = instantiate_run(configs, Path("runs") / f"cifar10-{args.run}" / "checkpoints" / "poisoned.ckpt")
    network = module.net.float().eval()
    validation = data.validation_dataset().tensors
    before = evaluate(network, *validation, data.num_classes, data.target_class)
    print(f"{args.run}, validation split ({len(validation[0])} images) before: CA {100 * before['clean_acc']:.2f} "
          f"ASR {100 * before['asr']:.2f} TA {100 * before['target_acc']:.2f}", flush=True)
    asr: dict[str, list[float]] = {combination: [] for combination in args.combinations}
    for seed in args.seeds:
        unseen = data.unseen_set(args.budget, seed)
        unseen = UnseenData(to_float(unseen.images), unseen.labels)
        estimate = TriggerEstimator(progress=False, seed=seed).estimate(network, unseen, args.layer)
        print(f"seed {seed}: flagged class {estimate.target_class} by {estimate.details['flagged_by']}", flush=True)
        if estimate.target_class != data.target_class:
            continue
        for combination in args.combinations:
            model = copy.deepcopy(network)
            triggers = triggers_of(combination, estimate)
            knowledge = BackdoorKnowledge.of(triggers, estimate.target_class)
            ActivationEditing(layer=args.layer, seed=seed).defend(model, unseen, knowledge)
            after = evaluate(model, *validation, data.num_classes, data.target_class)
            asr[combination].append(100 * after["asr"])
            print(f"  {combination:40s} CA {100 * after['clean_acc']:.2f} ASR {100 * after['asr']:.2f} "
                  f"TA {100 * after['target_acc']:.2f}", flush=True)
    print("mean validation ASR over the seeds where the target was found:")
    for combination, values in asr.items():
        if values:
            print(f"  {combination:40s} {statistics.mean(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
