"""``lightning-backdoor bench``: every defense side by side on the same poisoned models, budgets and seeds.

The grid is attacks × defenses × unseen budgets (images per class) × seeds. Each attack's poisoned model is trained
once through the CLI and cached under a hash of its parsed config, so a rerun (or an interrupted bench) reuses it;
already-trained runs elsewhere (``search_runs``) are recognised by the same hash. Finished grid cells are kept in
the CSV and skipped on a rerun. Writes ``results.csv`` (one row per run), ``results.md`` (mean ± std over seeds),
``results.png`` (ASR against clean accuracy; defense time on a log scale) and logs the table to W&B (offline).

    lightning-backdoor bench --config configs/bench/cifar10.yaml
"""

from __future__ import annotations

import copy
import csv
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser
from torch import nn

from lightning_backdoor.backdoor_cli import PARSER_KWARGS, BackdoorCLI, with_closest_option
from lightning_backdoor.defenses.base import DEFENSES, BackdoorKnowledge, Defense, UnseenData, defense_name
from lightning_backdoor.defenses.report import augmented_asr, near_chance
from lightning_backdoor.evaluation import evaluate, in_batches
from lightning_backdoor.io import atomic_write
from lightning_backdoor.metrics import defense_effectiveness_rating
from lightning_backdoor.precision import use_bf16
from lightning_backdoor.registry import Registry
from lightning_backdoor.runs import config_key, find_existing_run, instantiate_run, run_checkpoint, training_config
from lightning_backdoor.triggers import augmentation_images

COLUMNS = ("attack", "defense", "unseen_per_class", "seed", "num_unseen", "clean_acc", "asr", "asr_floor",
           "robust_acc", "target_acc", "mirrored_asr", "moved_asr", "der", "seconds", "clean_acc_before", "asr_before",
           "target_acc_before", "mirrored_asr_before", "moved_asr_before", "run", "test_images", "test_precision", "settings")
#: written into a model's cache folder once its training has finished
COMPLETE = "bench_complete.json"
#: Below this ASR before any defense a poisoned model has no backdoor to remove: the bench says so.
MIN_ASR = 0.5


def defense_settings(defense: Defense) -> str:
    """A defense's settings as one JSON line (its attributes), stored with each row: a resumed bench refuses rows
    that were made with other settings."""
    return json.dumps(_settings_of(defense), sort_keys=True, default=str)


def _settings_of(value: Any) -> Any:
    """An object's public attributes, nested objects (a composed defense, an estimator) by their own; a memory
    address never enters; a ``bf16`` setting as it runs here (``None``, auto, resolved: :func:`use_bf16`)."""
    if hasattr(value, "__dict__") and not isinstance(value, type) and not callable(value):
        return {"class": type(value).__name__} | {key: use_bf16(item) if key == "bf16" else _settings_of(item)
                                                   for key, item in vars(value).items() if not key.startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_settings_of(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _settings_of(item) for key, item in value.items()}
    return value


@dataclass
class BenchSettings:
    """A bench grid (attacks × defenses × budgets × seeds), where its models are cached and where results go.

    Args:
        attacks: attack names to run, each a key of ``attack_configs``.
        attack_configs: per attack name, the CLI config files that train its poisoned model.
        defenses: the defenses, ``class_path``/``init_args`` entries as everywhere else; each row is named by the
            defense's registered name, and every cell runs a fresh copy.
        budgets: unseen images per class given to each defense.
        seeds: unseen-split draws (the poisoned model is trained once per attack).
        overrides: flags applied to every training config.
        cache_dir: where trained poisoned models are kept, by a hash of their config.
        search_runs: folders of existing runs reused when their config has the same hash.
        output_dir: where results.csv, results.md, results.png and the W&B run go.
        threads: torch threads (default: torch's).
        test_images: score on a fixed random N of the test images (default: all), the same for every run.
        bf16: score under bfloat16 autocast (about twice as fast on a CPU that computes bfloat16 natively; on the
            CIFAR-10 models it moved CA by 0.03 pt and ASR by 0.1 pt against float32, docs/results/cifar10.md); false
            scores in float32; ``None`` (default): bfloat16 where the CPU computes it natively (the bench scores on
            the CPU; :func:`~lightning_backdoor.precision.native_bf16`).
        report_only: run nothing; tabulate and plot the grid's finished runs from the CSV.
        wandb: log the table to W&B (offline).
        wandb_project: the W&B project.
    """

    attacks: list[str]
    attack_configs: dict[str, list[str]]
    defenses: list[Defense]
    budgets: list[int]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    cache_dir: str = "runs/bench/models"
    search_runs: list[str] = field(default_factory=list)
    output_dir: str = "runs/bench/results"
    threads: int | None = None
    test_images: int | None = None
    bf16: bool | None = None
    report_only: bool = False
    wandb: bool = True
    wandb_project: str = "lightning-backdoor"

    def check(self) -> None:
        """One-line ``ValueError`` for an empty grid, an unknown attack, two defenses of one name or a budget < 1."""
        for axis in ("attacks", "defenses", "budgets", "seeds"):
            if not getattr(self, axis):
                raise ValueError(f"the bench grid is empty: no {axis} given (attacks × defenses × budgets × seeds)")
        unknown = [name for name in self.attacks if name not in self.attack_configs]
        if unknown:
            raise ValueError(f"unknown attack {unknown[0]!r}; known attacks: {', '.join(sorted(self.attack_configs))}")
        names = [defense_name(defense) for defense in self.defenses]
        repeated = next((name for index, name in enumerate(names) if name in names[:index]), None)
        if repeated is not None:
            raise ValueError(f"defense {repeated!r} is listed twice; a bench row is named by its defense, so list each "
                             f"defense once (compare settings in separate benches)")
        if min(self.budgets) < 1:
            raise ValueError(f"budgets are unseen images per class and must be >= 1, got {self.budgets}")


def fit_run(configs: list[str], overrides: list[str], run_dir: Path) -> None:
    """Train one poisoned model into ``run_dir`` as ``lightning-backdoor fit`` does.

    Raises:
        ValueError: (one line) the CLI refused the fit (nothing was written).
    """
    args = ["fit", *[arg for config in configs for arg in ("--config", config)], *overrides,
            f"--trainer.default_root_dir={run_dir}"]
    torch.set_float32_matmul_precision("high")  # as the command line sets it
    BackdoorCLI(args=args, parser_kwargs=PARSER_KWARGS | {"prog": "lightning-backdoor"})


class Bench:
    """Runs a :class:`BenchSettings` grid; ``fit`` is the training function (``fit_run``), counted in ``fits``."""

    def __init__(self, settings: BenchSettings, fit: Callable[[list[str], list[str], Path], None] | None = None,
                 log: Callable[[str], None] = print) -> None:
        settings.check()
        settings = replace(settings, bf16=use_bf16(settings.bf16))  # auto resolved: the rows say what ran
        self.settings, self.fit, self.log, self.fits = settings, fit or fit_run, log, 0
        self.output_dir = Path(settings.output_dir)

    def model_run(self, attack: str) -> tuple[Path, list[str]]:
        """The run folder holding ``attack``'s poisoned model (trained now if neither cached nor found) and the
        configs that describe it."""
        settings = self.settings
        configs = settings.attack_configs[attack]
        config = training_config(configs, settings.overrides)
        if config["data"].get("init_args", {}).get("all_to_all"):  # refused before any training
            raise ValueError(f"attack {attack!r} is all-to-all; the bench's defenses and its TA column need one "
                             f"target class (all-to-one)")
        key = config_key(config)
        run_dir = Path(settings.cache_dir) / f"{attack}-{key}"
        if (run_dir / COMPLETE).is_file() and run_checkpoint(run_dir) is not None:
            self.log(f"[bench] {attack}: cached model {run_dir}")
            return run_dir, configs
        existing = find_existing_run(key, settings.search_runs)
        if existing is not None:
            self.log(f"[bench] {attack}: reusing the already-trained run {existing} (same config hash {key})")
            return existing, configs
        if run_dir.exists():  # an interrupted fit: keep it aside, never overwrite
            run_dir.rename(run_dir.with_name(f"{run_dir.name}-interrupted-{int(time.time())}"))
        self.log(f"[bench] {attack}: training the poisoned model into {run_dir}")
        started = time.perf_counter()
        self.fit(configs, settings.overrides, run_dir)
        self.fits += 1
        if run_checkpoint(run_dir) is None:
            raise ValueError(f"training {attack} wrote no checkpoint under {run_dir / 'checkpoints'}")
        atomic_write(run_dir / COMPLETE, lambda tmp: Path(tmp).write_text(json.dumps(
            {"key": key, "configs": configs, "overrides": settings.overrides,
             "seconds": time.perf_counter() - started})))
        return run_dir, configs

    def load(self, attack: str) -> tuple[Path, nn.Module, Any, tuple, tuple, dict[str, Any]]:
        """``attack``'s run folder, poisoned network (float, eval), data module, test tensors, the trigger's mirror
        image and moves (:func:`~lightning_backdoor.triggers.augmentation_images`) and the metrics (with
        ``mirrored_asr`` and ``moved_asr`` where the trigger has them)."""
        run_dir, configs = self.model_run(attack)
        module, data = instantiate_run(configs, run_checkpoint(run_dir), self.settings.overrides)
        network = module.net.float().eval()
        test = data.test_dataset().tensors
        if self.settings.test_images is not None:  # a fixed random subset: a source's test set may be sorted by class
            order = torch.randperm(len(test[0]), generator=torch.Generator().manual_seed(0))
            subset = order[:self.settings.test_images]
            test = tuple(tensor[subset] for tensor in test)
        augmented = augmentation_images(data.trigger, test[0][:2].float() / 255)
        before = self.scores(network, data, test, augmented)
        extra = "".join(f", {title} {before[name]:.4f}" for name, title in (("mirrored_asr", "mirrored trigger"),
                                                                           ("moved_asr", "worst move"))
                        if name in before)
        self.log(f"[bench] {attack}: before any defense CA {before['clean_acc']:.4f} ASR {before['asr']:.4f}"
                 f"{extra} on {len(test[0])} test images "
                 f"({'bf16' if self.settings.bf16 else 'float32'})")
        total = len(test[0])
        if near_chance(round(before["clean_acc"] * total), total, data.num_classes):
            self.log(f"[bench] warning: {attack}'s poisoned model is near chance on clean test images (CA "
                     f"{before['clean_acc']:.4f}): its rows measure nothing; train it longer")
        elif before["asr"] < MIN_ASR:
            self.log(f"[bench] warning: {attack}'s poisoned model has no working backdoor (ASR {before['asr']:.4f} "
                     f"before any defense): its rows measure nothing; train it longer")
        return run_dir, network, data, test, augmented, before

    def scores(self, model: nn.Module, data: Any, test: tuple, augmented: tuple) -> dict[str, Any]:
        """The test metrics of ``model`` and, where the trigger has them (``augmented``:
        :func:`~lightning_backdoor.triggers.augmentation_images`'), ``mirrored_asr`` and ``moved_asr``."""
        values = evaluate(model, *test, data.num_classes, data.target_class, bf16=self.settings.bf16)
        return values | augmented_asr(model, *augmented, data.target_class, in_batches(*test[:2]),
                                      bf16=self.settings.bf16)

    def run(self) -> list[dict[str, Any]]:
        """Run every missing grid cell, append it to the CSV, then write the table, plot and W&B log."""
        settings = self.settings
        if settings.threads:
            torch.set_num_threads(settings.threads)
        csv_path = self.output_dir / "results.csv"
        rows = read_rows(csv_path)
        configured = {defense_name(defense): defense for defense in settings.defenses}
        for row in rows:  # rows of an older bench without settings are taken as they are
            name = row["defense"]
            if name in configured and row.get("settings") and row["settings"] != defense_settings(configured[name]):
                raise ValueError(f"{csv_path} holds {name} rows made with other settings ({row['settings']}, now "
                                 f"{defense_settings(configured[name])}); give another output_dir")
        done = {(row["attack"], row["defense"], int(row["unseen_per_class"]), int(row["seed"])) for row in rows}
        # seeds outermost, then defenses in the listed order: an interrupted bench has the first defenses on every
        # attack for the first seeds, rather than some attacks or seeds complete and others missing
        cells = [(attack, defense, budget, seed) for seed in settings.seeds for budget in settings.budgets
                 for defense in map(defense_name, settings.defenses) for attack in settings.attacks]
        todo = [] if settings.report_only else [cell for cell in cells if cell not in done]
        finished = sum(cell in done for cell in cells)
        self.log(f"[bench] {len(cells)} runs in the grid, {finished} already in {csv_path}"
                 + (" (report only)" if settings.report_only else ""))
        loaded: dict[str, Any] = {}
        for attack, name, budget, seed in todo:
            if attack not in loaded:
                loaded[attack] = self.load(attack)
            run_dir, network, data, test, augmented, before = loaded[attack]
            if budget > data.unseen_per_class:
                self.log(f"[bench] skipped {attack}/{name} at {budget}/class: the run's unseen split "
                         f"holds {data.unseen_per_class} per class (train with unseen_per_class >= {budget})")
                continue
            unseen = data.unseen_set(budget, seed)
            images = UnseenData(unseen.images.float() / 255, unseen.labels)
            model = copy.deepcopy(network)
            defense = copy.deepcopy(configured[name])  # as configured: no state from an earlier cell
            torch.manual_seed(seed)
            started = time.perf_counter()
            defense.defend(model, images, BackdoorKnowledge.of(data.trigger, data.target_class))
            seconds = time.perf_counter() - started
            after = self.scores(model, data, test, augmented)
            row = {"attack": attack, "defense": name, "unseen_per_class": budget, "seed": seed,
                   "num_unseen": len(unseen.labels), "seconds": seconds, "run": str(run_dir),
                   "test_images": len(test[0]), "test_precision": "bf16" if settings.bf16 else "float32",
                   "settings": defense_settings(configured[name]),
                   "der": defense_effectiveness_rating(before["asr"], after["asr"], before["clean_acc"],
                                                       after["clean_acc"]),
                   "clean_acc_before": before["clean_acc"], "asr_before": before["asr"],
                   "target_acc_before": before["target_acc"]}
            row |= {f"{metric}_before": before[metric] for metric in ("mirrored_asr", "moved_asr") if metric in before}
            row |= {metric: after[metric] for metric in ("clean_acc", "asr", "asr_floor", "robust_acc", "target_acc",
                                                         "mirrored_asr", "moved_asr") if metric in after}
            append_row(csv_path, row)
            rows.append(row)
            done.add((attack, name, budget, seed))
            self.log(f"[bench] {len(done)}/{len(cells)} {attack} {name} {budget}/class seed {seed}: "
                     f"CA {after['clean_acc']:.4f} ASR {after['asr']:.4f} "
                     + "".join(f"{title} {after[name]:.4f} " for name, title in (("mirrored_asr", "mirrored"),
                                                                                 ("moved_asr", "moved"))
                               if name in after)
                     + f"TA {after['target_acc']:.4f} "
                     f"DER {row['der']:.3f} in {seconds:.2f} s")
        grid = set(cells)
        rows = [row for row in read_rows(csv_path)
                if (row["attack"], row["defense"], int(row["unseen_per_class"]), int(row["seed"])) in grid]
        if not rows:
            self.log("[bench] no finished runs to tabulate")
            return rows
        markdown = table(rows)
        atomic_write(self.output_dir / "results.md", lambda tmp: Path(tmp).write_text(markdown + "\n"))
        plot(rows, self.output_dir / "results.png")
        if settings.wandb:
            log_wandb(rows, markdown, self.output_dir, settings.wandb_project)
        self.log(markdown)
        self.log(f"[bench] {csv_path}, {self.output_dir / 'results.md'}, {self.output_dir / 'results.png'}")
        return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The CSV's rows with numbers parsed, ``None`` where a cell is empty (a metric not measured: the mirror image of a
    symmetric trigger, the moves of a global one); empty if there is no CSV yet."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if key not in ("attack", "defense", "run", "test_precision", "settings"):
                row[key] = float(value) if value != "" else None
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one run to the CSV (header first if new) and flush, so an interrupted bench keeps it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    columns = COLUMNS
    if not new:  # a CSV of an older bench keeps its own columns
        with open(path, newline="") as handle:
            columns = tuple(next(csv.reader(handle), COLUMNS))
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow({key: row.get(key, "") for key in columns})


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["attack"], int(row["unseen_per_class"]), row["defense"]), []).append(row)
    return groups


def _cell(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    values = [value * scale for value in values]
    if len(values) == 1:  # one seed: no spread to show
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown, mean ± std over seeds: CA, ASR, ASR floor, the mirrored trigger's ASR and the worst move's
    (:func:`~lightning_backdoor.triggers.augmentation_images`; blank where the trigger has none, or for rows of a CSV
    written before they were measured), RA, TA in %, DER, seconds and the ratio of the mean seconds to the
    ``editing`` row's of the same attack and budget (blank without one); one "none" row per attack."""
    lines = ["| attack | unseen/class | unseen images | defense | CA % | ASR % | ASR floor % | mirrored ASR % | "
             "moved ASR % | RA % | TA % | DER | seconds | × editing | seeds |", "|" + " --- |" * 15]
    groups = _groups(rows)
    shown_none: set[tuple[str, int]] = set()
    for (attack, budget, defense), group in sorted(groups.items()):
        if (attack, budget) not in shown_none:
            shown_none.add((attack, budget))
            first = group[0]
            augmented = " | ".join(f"{first[name] * 100:.2f}" if isinstance(first.get(name), float) else ""
                                   for name in ("mirrored_asr_before", "moved_asr_before"))
            lines.append(f"| {attack} | {budget} | – | none | {first['clean_acc_before'] * 100:.2f} | "
                         f"{first['asr_before'] * 100:.2f} | | {augmented} | | "
                         f"{first['target_acc_before'] * 100:.2f} | | | | |")
        pick = lambda name: [row[name] for row in group]  # noqa: E731
        augmented = " | ".join(_cell(pick(name)) if all(isinstance(row.get(name), float) for row in group) else ""
                               for name in ("mirrored_asr", "moved_asr"))
        editing = groups.get((attack, budget, "editing"))
        ratio = (f"{statistics.mean(pick('seconds')) / statistics.mean(row['seconds'] for row in editing):.1f}"
                 if editing else "")
        lines.append(f"| {attack} | {budget} | {int(group[0]['num_unseen'])} | {defense} | {_cell(pick('clean_acc'))} "
                     f"| {_cell(pick('asr'))} | {_cell(pick('asr_floor'))} | {augmented} | "
                     f"{_cell(pick('robust_acc'))} | {_cell(pick('target_acc'))} | {_cell(pick('der'), 1, 3)} | {_cell(pick('seconds'), 1, 2)} | "
                     f"{ratio} | {len(group)} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Two panels of per-(attack, budget, defense) means: ASR against CA, and ASR against defense seconds (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(rows)
    defenses = sorted({defense for _, _, defense in groups})
    colors = {name: plt.get_cmap("tab10")(index % 10) for index, name in enumerate(defenses)}
    markers = dict(zip(sorted({attack for attack, _, _ in groups}), "os^Dvx*+"))
    figure, (accuracy_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for (attack, budget, defense), group in groups.items():
        mean = lambda name: statistics.mean(row[name] for row in group)  # noqa: E731
        style = {"color": colors[defense], "marker": markers[attack], "s": 30 + 4 * min(budget, 50)}
        accuracy_axis.scatter(100 * mean("clean_acc"), 100 * mean("asr"), **style)
        time_axis.scatter(max(mean("seconds"), 1e-3), 100 * mean("asr"), **style)
    for attack in markers:
        group = next(g for (a, _, _), g in groups.items() if a == attack)
        accuracy_axis.scatter(100 * group[0]["clean_acc_before"], 100 * group[0]["asr_before"], color="black",
                              marker=markers[attack], s=60, facecolors="none")
    accuracy_axis.set(xlabel="clean accuracy %", ylabel="ASR %", title="ASR vs clean accuracy (hollow black: none)")
    time_axis.set(xscale="log", xlabel="defense seconds (log)", ylabel="ASR %", title="ASR vs defense time")
    handles = [plt.Line2D([], [], color=colors[name], marker="o", linestyle="", label=name) for name in defenses]
    handles += [plt.Line2D([], [], color="grey", marker=marker, linestyle="", label=attack)
                for attack, marker in markers.items()]
    time_axis.legend(handles=handles, fontsize=8, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)
    return path


def log_wandb(rows: list[dict[str, Any]], markdown: str, output_dir: Path, project: str) -> None:
    """Log every run as a W&B table and the summary as text, offline, with files under ``output_dir``."""
    import wandb

    output_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, name="bench", dir=str(output_dir), mode="offline", job_type="bench")
    try:
        run.log({"bench/runs": wandb.Table(columns=list(COLUMNS), data=[[row.get(key) for key in COLUMNS] for row in rows]),
                 "bench/summary": wandb.Html(f"<pre>{markdown}</pre>")})
    finally:
        run.finish()


def parser() -> ArgumentParser:
    """The ``bench`` command's arguments: every :class:`BenchSettings` field, from a YAML ``--config`` or flags."""
    arguments = ArgumentParser(prog="lightning-backdoor bench", description=__doc__.splitlines()[0],
                               parser_mode="omegaconf", exit_on_error=False, allow_abbrev=False)
    arguments.add_argument("--config", action=ActionConfigFile)
    arguments.add_class_arguments(BenchSettings, nested_key=None, fail_untyped=True)
    return arguments


#: jsonargparse's words for a ``defenses`` entry whose ``class_path`` does not import, with the path it was given
_UNIMPORTED_DEFENSE = re.compile(r'^Parser key "defenses":\s+(?:Expected a dot import path string: (\S+)|Problem with '
                                 r"given class_path '([^']+)':\s+(?:module '[^']*' has no attribute|No module named))")


def unknown_defense(error: ArgumentError) -> ValueError | None:
    """A one-line ``ValueError`` for a ``defenses`` entry whose ``class_path`` does not import, naming the close
    :data:`~lightning_backdoor.defenses.base.DEFENSES` class names by the registry's close-name lookup (a registered
    row name such as ``ft`` is pointed to its class); ``None`` for any other parse error, and for a dotted path with
    no close name (another package's class: jsonargparse's own reason says more)."""
    match = _UNIMPORTED_DEFENSE.match(str(error))
    if match is None:
        return None
    given = match.group(1) or match.group(2)
    short = given.rpartition(".")[2]
    classes: Registry[str] = Registry("defense class", "defense classes")  # class name -> itself (a str: no renaming)
    for defense in DEFENSES.values():
        classes.register(defense.__name__)(defense.__name__)
    if short in DEFENSES:
        return ValueError(f"defenses: {given!r} is the row name of class_path {DEFENSES[short].__name__!r}; write "
                          f"class_path: {DEFENSES[short].__name__}")
    try:
        classes.lookup(short)
    except ValueError as lookup_error:
        if "did you mean" not in str(lookup_error) and "." in given:
            return None
        return ValueError(f"defenses: class_path {given!r} does not import: {lookup_error}")
    return None  # a known class name under another module path: jsonargparse's reason stands


def run_bench(args: list[str]) -> list[dict[str, Any]]:
    """``lightning-backdoor bench``: parse, check the grid, run it; the rows of the grid's finished runs.

    Raises:
        jsonargparse.ArgumentError: arguments or a config that do not parse (e.g. an unknown defense class).
        ValueError: (one line) a refused grid (:meth:`BenchSettings.check`) or a refused training.
    """
    arguments = parser()
    try:
        parsed = arguments.parse_args(args)
    except ArgumentError as error:
        suggestion = unknown_defense(error)
        if suggestion is not None:
            raise suggestion from None
        raise with_closest_option(error, arguments, args) from None
    config = arguments.instantiate(parsed)
    values = {key: value for key, value in vars(config).items() if key != "config"}
    return Bench(BenchSettings(**values)).run()


if __name__ == "__main__":
    run_bench(sys.argv[1:])
