"""README and docs/: short README, links that resolve, a generated parameter page, and no command untested.

Every shell command in a ```bash block of README.md or docs/*.md must appear in
:data:`COMMANDS`, mapped to the test that runs it (or to ``.ci/run``); a new
command without a mapping, a mapping to a test that does not exist, or a
mapping whose test file never mentions the command's telling word fails here.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from pipeline import paramdoc
from trainer.checkpoint import ELASTIC, SPEED_ONLY

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
CI = ".ci/run"

# Command as shown (shlex words joined by one space, comments dropped) -> (where it runs, a word that
# file must contain). Where the test runs the command's equivalent rather than its literal text (a tiny
# generated dataset, the params set in params.yaml then `dvc repro`, the trainer called in-process), the
# word names what it exercises.
COMMANDS: dict[str, tuple[str, str]] = {
    "bash .ci/setup && dvc repro": (CI, ""),
    "bash .ci/setup && python3 -m pytest -q": (CI, ""),
    "bash .ci/setup": (CI, ""),
    "dvc exp run -S data.dataset=csv -S data.image_shape=[3,48,48]": (
        "tests/test_any_shape_dvc.py::test_csv_of_any_shape_through_dvc_repro",
        '"data.image_shape"',
    ),
    "dvc exp run -S data.dataset=images -S data.image_shape=[3,32,32]": (
        "tests/test_any_shape_dvc.py::test_image_folder_through_dvc_repro_and_an_added_image_reruns_only_data_stages",
        '"images"',
    ),
    "dvc exp run -S loader.num_workers=2": (
        "tests/test_train_stage_dvc.py::test_dvc_exp_run_with_other_loader_settings_reports_the_same_accuracy",
        '"loader.num_workers=2"',
    ),
    "python -m trainer.predict --model models photo.jpg": (
        "tests/test_predict.py::test_the_command_prints_a_line_per_file",
        '"trainer.predict"',
    ),
    "python -m trainer.predict --model models photo.jpg scan.png": (
        "tests/test_predict.py::test_the_command_prints_a_line_per_file",
        '"trainer.predict"',
    ),
    "dvc exp show": (
        "tests/test_train_stage_dvc.py::test_dvc_exp_run_with_other_loader_settings_reports_the_same_accuracy",
        '"exp", "show"',
    ),
    "dvc metrics diff": (
        "tests/test_train_stage_dvc.py::test_dvc_exp_run_with_other_loader_settings_reports_the_same_accuracy",
        '"metrics", "diff"',
    ),
    "dvc plots show": (
        "tests/test_plots_offline.py::test_plots_show_draws_every_metric_offline",
        '"plots", "show"',
    ),
    "git checkout .dvc/vega-offline.html && dvc plots show": (
        "tests/test_plots_offline.py::test_without_the_template_dvc_refuses_instead_of_using_a_cdn",
        '"checkout"',
    ),
    "dvc exp show --no-pager --only-changed --keep test_ --drop "
    "Created|train_loss|step|epoch_seconds|samples_per_second|data_wait_fraction|peak_memory_mb|.*/": (
        "tests/test_team_remote.py::test_experiment_shared_through_git",
        "check_readme_exp_show_in_80_columns",  # reads the line from docs/experiments.md
    ),
    "dvc exp run -n lr-high -S train.lr=0.01": (
        "tests/test_team_remote.py::test_experiment_shared_through_git",
        '"train.lr=0.01"',
    ),
    "dvc exp push origin lr-high": (
        "tests/test_team_remote.py::test_experiment_shared_through_git",
        '"push"',
    ),
    "dvc exp pull origin lr-high": (
        "tests/test_team_remote.py::test_experiment_shared_through_git",
        '"pull"',
    ),
    "dvc exp apply lr-high && dvc checkout": (
        "tests/test_team_remote.py::test_experiment_shared_through_git",
        '"apply"',
    ),
    "dvc remote add -d storage ssh://me@host:22/srv/dvc-cache": (
        "tests/test_team_remote.py::test_pull_restores_every_cached_output_and_repro_runs_nothing",
        '"remote", "add", "-d", "storage"',
    ),
    "dvc remote modify --local storage keyfile ~/.ssh/id_ed25519": (
        "tests/test_team_remote.py::test_pull_restores_every_cached_output_and_repro_runs_nothing",
        '"--local", "storage", "keyfile"',
    ),
    "dvc remote modify storage verify true": (
        "tests/test_team_remote.py::test_corrupted_remote_file_is_detected_and_not_checked_out",
        '"verify", "true"',
    ),
    "git add .dvc/config && git commit -m DVC remote": (
        "tests/test_team_remote.py::test_pull_restores_every_cached_output_and_repro_runs_nothing",
        '"commit"',
    ),
    "dvc push": (
        "tests/test_team_remote.py::test_pull_restores_every_cached_output_and_repro_runs_nothing",
        'dvc(repo, "push")',
    ),
    "dvc status -c": (
        "tests/test_team_remote.py::test_pull_restores_every_cached_output_and_repro_runs_nothing",
        '"status", "-c"',
    ),
    "dvc pull": (
        "tests/test_team_remote.py::test_pull_restores_every_cached_output_and_repro_runs_nothing",
        'dvc(repo, "pull")',
    ),
    "dvc repro": (
        "tests/test_team_remote.py::test_pull_restores_every_cached_output_and_repro_runs_nothing",
        'dvc(pulled, "repro")',
    ),
    "dvc exp run -S train.processes=2": (
        "tests/test_ddp.py::test_dvc_exp_run_with_two_processes_reruns_only_train",
        '"train.processes=2"',
    ),
    "torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint host-a:29500 "
    "--rdzv-id mnist --max-restarts 3 -m stages.train --train data/tensors/train --test data/tensors/test "
    "--val data/tensors/val --model models --checkpoints checkpoints --live dvclive": (
        "tests/test_ddp.py::test_two_machines_match_two_local_processes",
        '"--rdzv-endpoint"',
    ),
    "torchrun --nnodes 2 --node-rank 1 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint host-a:29500 "
    "--rdzv-id mnist --max-restarts 3 -m stages.train --train data/tensors/train --test data/tensors/test "
    "--val data/tensors/val --model models --checkpoints checkpoints --live dvclive": (
        "tests/test_ddp.py::test_two_machines_match_two_local_processes",
        '"--node-rank"',
    ),
    "git clone <your-repo-url> project && cd project": (
        "tests/test_stream.py::test_streamed_training_is_bit_identical_and_the_cache_stays_under_its_limit",
        '"clone"',
    ),
    "python -m stages.train --train data/tensors/train --test data/tensors/test --val data/tensors/val "
    "--model models --checkpoints checkpoints --live dvclive": (
        "tests/test_stream.py::test_a_killed_run_resumes_with_its_warm_cache",
        '"stages.train"',
    ),
    "dvc exp run -S train.precision=bf16": (
        "tests/test_precision.py::test_bf16_training_differs_from_fp32_and_a_checkpoint_of_another_precision_is_not_resumed",
        '"bf16"',
    ),
    "dvc exp run -S train.augment=[flip,translate]": (
        "tests/test_augment.py::test_loader_settings_cannot_change_augmented_training",
        'AUGMENT = ["flip", "translate"]',
    ),
    "dvc exp run -S prep.shard_dtype=uint8": (
        "tests/test_uint8.py::test_uint8_runs_are_bit_identical_to_float32",
        '"uint8"',
    ),
    "python -m benchmarks.loader --quick": (
        "tests/test_bench.py::test_bench_writes_results",
        '"benchmarks.loader"',
    ),
    "python -m benchmarks.gpu --prepare .gpu-data": (
        "tests/test_gpu_bench.py::test_gpu_bench_prepares_and_runs_without_polars_dvc_or_dvclive",
        '"--prepare"',
    ),
    "python3 -m benchmarks.gpu --data .gpu-data --out $OUT": (
        "tests/test_gpu_bench.py::test_gpu_bench_prepares_and_runs_without_polars_dvc_or_dvclive",
        '"--data"',
    ),
    "python -m pipeline.paramdoc > docs/parameters.md": (
        "tests/test_docs.py::test_parameters_page_is_what_the_generator_writes",
        '"pipeline.paramdoc"',
    ),
    "python -m stages.tensorize --help": ("tests/test_tensorize.py::test_stage_help", '"--help"'),
    "python3 -m pytest -q tests/test_guarantees.py": (
        "tests/test_guarantees.py::test_every_guarantee_names_existing_tests",
        "docs/guarantees.md",
    ),
}


def _text(page: str) -> str:
    return (ROOT / page).read_text(encoding="utf-8")


def shown_commands(text: str) -> list[str]:
    """Each command line of the ```bash blocks: continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(" ".join(words))
    return out


def _function_names(file: Path) -> set[str]:
    tree = ast.parse(file.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def unmapped(pages: dict[str, str]) -> dict[str, list[str]]:
    """page -> shown commands that COMMANDS does not map."""
    found = {page: [c for c in shown_commands(text) if c not in COMMANDS] for page, text in pages.items()}
    return {page: cmds for page, cmds in found.items() if cmds}


def test_readme_is_short() -> None:
    assert len(_text("README.md").splitlines()) <= 250


def test_every_shown_command_is_mapped_to_what_runs_it() -> None:
    assert unmapped({page: _text(page) for page in PAGES}) == {}
    shown = {c for page in PAGES for c in shown_commands(_text(page))}
    assert not set(COMMANDS) - shown, f"mapped but shown nowhere: {sorted(set(COMMANDS) - shown)}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_mapping_names_a_test_that_exists_and_runs_the_command(command: str) -> None:
    where, word = COMMANDS[command]
    if where == CI:
        ci = [line.strip() for line in _text(CI).splitlines()]
        steps = [part.strip() for part in command.split("&&")]
        at = [ci.index(step) for step in steps]  # ValueError: .ci/run does not run it
        assert at == sorted(at), (command, ci)
        return
    file, test = where.split("::")
    assert test in _function_names(ROOT / file), where
    assert word and word in _text(file), (command, where, word)


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    shown = [c for c in shown_commands(_text("README.md")) if "pytest" in c]
    assert shown == ["bash .ci/setup && python3 -m pytest -q"]
    assert COMMANDS[shown[0]][0] == CI


def test_a_new_command_without_a_mapping_is_caught() -> None:
    page = (
        "# X\n\n```bash\ndvc exp show   # mapped\ndvc gc -w \\\n  --force\n```\n\n```text\nnot a cmd\n```\n"
    )
    assert unmapped({"x.md": page}) == {"x.md": ["dvc gc -w --force"]}


def test_every_docs_page_starts_with_a_runnable_example() -> None:
    for page in PAGES[1:]:
        body = _text(page).split("\n", 1)[1].lstrip("\n")
        if body.startswith("<!--"):  # the generated page's note
            body = body.split("-->", 1)[1].lstrip("\n")
        assert body.startswith("```bash\n"), page


# --- links -------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def _prose(text: str) -> str:
    """``text`` without fenced blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))


def anchors(text: str) -> set[str]:
    return {
        _slug(m)
        for m in re.findall(r"^#+\s+(.+)$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M)
    }


def broken_links(page: Path) -> list[str]:
    out = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        bad_anchor = anchor and (
            dest.suffix != ".md" or anchor not in anchors(dest.read_text(encoding="utf-8"))
        )
        if not dest.exists() or bad_anchor:
            out.append(target)
    return out


@pytest.mark.parametrize("page", PAGES)
def test_every_link_resolves(page: str) -> None:
    assert broken_links(ROOT / page) == []


def test_the_link_checker_catches_missing_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A\n\n## Two words, `code`\n\ntext\n")
    (tmp_path / "b.md").write_text(
        "[ok](a.md) [ok](a.md#two-words-code) ![img](a.md) [web](https://x.org/y)\n"
        "[gone](c.md) [bad anchor](a.md#three) [self](#nowhere) `[inline](c.md)`\n\n"
        "```bash\n[x](c.md)\n```\n"
    )
    assert broken_links(tmp_path / "b.md") == ["c.md", "a.md#three", "#nowhere"]


# --- parameters ---------------------------------------------------------------------------------------


def test_parameters_page_is_what_the_generator_writes() -> None:
    """The page's own regeneration command, run as shown."""
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.paramdoc"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert res.stdout == _text("docs/parameters.md"), (
        "docs/parameters.md is stale: python -m pipeline.paramdoc > docs/parameters.md"
    )


# Documented speed-only although the resume fingerprint still covers them: deleting the last step's loss
# and logits before the next forward frees memory and computes the same (test_trainer.py checks it frees).
SPEED_BY_CONSTRUCTION = {"train.free_graph"}


def test_every_effect_agrees_with_what_the_trainer_declares() -> None:
    """speed: in SPEED_ONLY (whose test proves it); rounding: ELASTIC or the float order; the rest results."""
    speed = (
        SPEED_ONLY - {"train.epochs"}
    ) | SPEED_BY_CONSTRUCTION  # epochs: out of the fingerprint to resume
    for key, doc in paramdoc.KEYS.items():
        if not key.startswith(("loader.", "train.")):
            continue
        if key in ELASTIC:
            assert doc.effect == "rounding", key
        elif key in speed:
            assert doc.effect == "speed", key
        else:
            assert doc.effect != "speed", f"{key} is documented speed-only but is not in SPEED_ONLY"


@pytest.mark.parametrize(
    "edit, message",
    [
        (("seed: 42", "seed: '42'"), "train.seed: params.yaml has '42'"),
        (("lr: 0.001", "lr: 0.01"), "train.lr: params.yaml has 0.01"),
        (("  epochs: 5\n", ""), "only in the dataclasses: ['train.epochs']"),
    ],
)
def test_the_generator_refuses_drift_between_params_yaml_and_the_code(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    text = _text("params.yaml")
    assert edit[0] in text
    (tmp_path / "params.yaml").write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(SystemExit, match=re.escape(message)):
        paramdoc.markdown(tmp_path / "params.yaml")


def test_every_key_has_one_description(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(paramdoc.KEYS, "loader.batch_size")
    with pytest.raises(SystemExit, match=re.escape("only in the dataclasses: ['loader.batch_size']")):
        paramdoc.markdown(ROOT / "params.yaml")
