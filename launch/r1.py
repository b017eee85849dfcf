"""The whole DeepSeek-R1 post-training chain in one command: pretrained base -> cold-start SFT -> GRPO ->
rejection sampling -> SFT on the kept traces -> distillation into a dense student (and the same student
on the gold answers alone, the baseline), then held-out pass@1 / pass@k of every phase in one table.

    python launch/r1.py                                    # configs/r1/tiny.yaml into runs/r1_tiny
    python launch/r1.py --chain configs/r1/tiny.yaml --out runs/r1_tiny --set grpo:train.max_steps=50
    python launch/r1.py --list                             # the phases and the commands they run

Each phase is a subprocess of an existing launcher (launch/pretrain.py, sft.py, grpo.py,
rejection_sample.py, evaluate.py) with the experiment preset and Hydra overrides the chain file names,
run in `<out>/<phase>`; a phase starts from the previous one's latest checkpoint by
`checkpoint.init_from`. Resumable: a phase that finished leaves `<out>/<phase>/phase.json` (its command,
wall and CPU seconds) and is skipped when the chain runs again; an interrupted one runs again and its
trainer resumes from its last checkpoint (train.resume=auto). A finished phase whose command has changed
since (other overrides) is refused, not silently reused: pass a new --out, or delete that phase's
directory. Progress: each phase's own log lines (steps, tokens/s, ETA), prefixed by the phase name.
Exit code: 2 for a bad chain file or option, else the failing phase's exit code.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ("pretrain", "sft", "grpo", "rejection_sample", "evaluate")
PHASE_KEYS = {"name", "launcher", "experiment", "init_from", "overrides"}


class ChainError(ValueError):
    pass


def load_chain(path: str) -> dict:
    """The chain file, checked: phase names unique, launchers known, init_from and {phase} references
    naming earlier phases, evaluated phases existing."""
    with open(path) as f:
        chain = yaml.safe_load(f) or {}
    unknown = set(chain) - {"phases", "evaluate", "common"}
    if unknown:
        raise ChainError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: phases, evaluate, common")
    phases = chain.get("phases") or []
    if not phases:
        raise ChainError(f"{path}: no phases")
    seen: list[str] = []
    for p in phases:
        extra = set(p) - PHASE_KEYS
        if extra:
            raise ChainError(f"{path}: phase {p.get('name')!r}: unknown key(s) {sorted(extra)}; allowed: "
                             f"{sorted(PHASE_KEYS)}")
        name = p.get("name")
        if not name or name in seen or name == "eval":
            raise ChainError(f"{path}: phase name {name!r}: must be given, unique and not 'eval'")
        if p.get("launcher") not in LAUNCHERS:
            raise ChainError(f"{path}: phase {name!r}: launcher {p.get('launcher')!r}; must be one of "
                             f"{', '.join(LAUNCHERS)}")
        if p.get("init_from") is not None and p["init_from"] not in seen:
            raise ChainError(f"{path}: phase {name!r}: init_from {p['init_from']!r} is not an earlier phase "
                             f"({', '.join(seen) or 'none'})")
        for o in p.get("overrides") or []:
            for ref in _references(o):
                if ref not in seen:
                    raise ChainError(f"{path}: phase {name!r}: override {o!r} names {{{ref}}}, not an earlier phase")
        seen.append(name)
    ev = chain.get("evaluate")
    if ev:
        missing = [q for q in ev.get("phases") or [] if q not in seen]
        if missing or not ev.get("experiment"):
            raise ChainError(f"{path}: evaluate: needs an experiment and phases among {seen}; got {missing or ev}")
    return chain


def _references(override: str) -> list[str]:
    out, rest = [], override
    while "{" in rest and "}" in rest.split("{", 1)[1]:
        ref, rest = rest.split("{", 1)[1].split("}", 1)
        out.append(ref)
    return out


def _substitute(override: str, dirs: dict[str, str]) -> str:
    for ref in _references(override):
        override = override.replace("{" + ref + "}", dirs[ref])
    return override


def plan(chain: dict, out: str, extra: dict[str, list[str]]) -> list[dict]:
    """Every step of the chain: phase name, run directory, the command, the phase it starts from."""
    dirs = {p["name"]: os.path.join(out, p["name"]) for p in chain["phases"]}
    common = list(chain.get("common") or []) + extra.get("all", [])
    steps = []
    for p in chain["phases"]:
        run_dir = dirs[p["name"]]
        args = [f"+experiment={p['experiment']}", f"hydra.run.dir={run_dir}"]
        if p.get("init_from"):
            args.append(f"checkpoint.init_from={os.path.join(dirs[p['init_from']], 'checkpoints')}")
        args += common + [_substitute(o, dirs) for o in p.get("overrides") or []] + extra.get(p["name"], [])
        steps.append({"name": p["name"], "dir": run_dir, "launcher": p["launcher"], "init_from": p.get("init_from"),
                      "command": [sys.executable, os.path.join(ROOT, "launch", p["launcher"] + ".py"), *args]})
    ev = chain.get("evaluate")
    for q in (ev or {}).get("phases") or []:
        args = [f"+experiment={ev['experiment']}", f"checkpoint.init_from={os.path.join(dirs[q], 'checkpoints')}",
                *common, *(ev.get("overrides") or []), *extra.get("eval", [])]
        # evaluated in this process, one after the other: one interpreter start instead of one per phase
        steps.append({"name": f"eval/{q}", "dir": os.path.join(out, "eval", q), "launcher": "evaluate",
                      "init_from": q, "command": ["(in process)", *args]})
    return steps


def _children_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def _own_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _run_subprocess(step: dict) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    with open(os.path.join(step["dir"], "phase.log"), "a") as log:
        proc = subprocess.Popen(step["command"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT, env=env, bufsize=1)
        try:
            for line in proc.stdout:
                log.write(line)
                print(f"[{step['name']}] {line}", end="", flush=True)
            rc = proc.wait()
        except KeyboardInterrupt:  # the child got the same Ctrl-C: it saves a checkpoint and exits
            proc.wait()
            print(f"[r1] {step['name']}: interrupted; run the same command again to resume", flush=True)
            raise
    if rc != 0:
        print(f"[r1] {step['name']}: failed with exit code {rc} (log: {log.name}); run the same command again "
              "to resume", flush=True)
        sys.exit(rc)


def _eval_config(step: dict):
    """The composed config of an evaluation step (launch/evaluate.py's, without a Hydra run)."""
    sys.path.insert(0, ROOT)
    from hydra import compose, initialize_config_dir

    from dsv3.config.store import register, to_config

    register()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base="1.3"):
        # checkpoint.dir defaults to the Hydra run directory, which a composed config has not got
        return to_config(compose("config", overrides=[*step["command"][1:],
                                                      f"checkpoint.dir={os.path.join(step['dir'], 'checkpoints')}"]))


def check_evaluations(steps: list[dict]) -> None:
    """Before any phase runs: the evaluations' held-out problems exist (else the chain would stop at its
    end, after every phase had run). Their settings are the same for every phase: one check."""
    ev = [s for s in steps if s["launcher"] == "evaluate"]
    if not ev:
        return
    cfg = _eval_config(ev[0])
    from dsv3.config import ConfigError
    from dsv3.rl.config_rules import enough_problems

    try:
        enough_problems(cfg, "rl.eval_problems", "held_out", cfg.rl.eval_difficulties)
    except ConfigError as e:
        raise ChainError(f"evaluate: {e}") from None


def _evaluate(step: dict) -> None:
    """launch/evaluate.py's work on the composed config of this step, in this process."""
    cfg = _eval_config(step)
    from dsv3.config import ConfigError, validate
    from dsv3.parallel.mesh import pick_device
    from dsv3.rl.evaluate import evaluate_checkpoint, prepare_evaluation

    try:
        tokenizer = prepare_evaluation(cfg)
        validate(cfg, world_size=1, local_world_size=1)
    except ConfigError as e:
        raise ChainError(f"{step['name']}: {e}") from None
    result = evaluate_checkpoint(cfg, tokenizer, pick_device(cfg.train.device, 0))
    with open(os.path.join(step["dir"], "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"[{step['name']}] pass@1 {result['pass@1']:.3f} ± {result['stderr/pass@1']:.3f}, format "
          f"{result['format']:.2f}", flush=True)


def run_step(step: dict, index: int, total: int) -> dict:
    """Runs one step unless it finished before with the same command; returns its phase.json record."""
    marker = os.path.join(step["dir"], "phase.json")
    shown = " ".join(step["command"][1:])
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if done["command"][1:] != step["command"][1:]:
            raise ChainError(f"phase {step['name']} finished before with another command:\n  was: "
                             f"{' '.join(done['command'][1:])}\n  now: {shown}\nuse another --out, or delete "
                             f"{step['dir']} to run it again")
        print(f"[r1] {index}/{total} {step['name']}: done before ({done['wall_s']:.0f} s), skipped", flush=True)
        return done
    os.makedirs(step["dir"], exist_ok=True)
    start, cpu0 = time.perf_counter(), _children_cpu() + _own_cpu()
    if step["launcher"] == "evaluate":
        print(f"[r1] {index}/{total} {step['name']}: running: evaluate {shown}", flush=True)
        _evaluate(step)
    else:
        resumed = os.path.isdir(os.path.join(step["dir"], "checkpoints"))
        print(f"[r1] {index}/{total} {step['name']}: {'resuming' if resumed else 'running'}: {shown}", flush=True)
        _run_subprocess(step)
    record = {"name": step["name"], "command": step["command"], "init_from": step["init_from"],
              "wall_s": round(time.perf_counter() - start, 1),
              "cpu_s": round(_children_cpu() + _own_cpu() - cpu0, 1)}
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, marker)
    print(f"[r1] {step['name']}: done in {record['wall_s']:.0f} s wall, {record['cpu_s']:.0f} s CPU", flush=True)
    return record


def summary(steps: list[dict], records: dict[str, dict], out: str) -> list[dict]:
    """One row per evaluated phase: held-out pass@1 (± its standard error), pass@k, format compliance,
    length, and the phase's own wall and CPU time."""
    rows = []
    for s in steps:
        if s["launcher"] != "evaluate":
            continue
        with open(os.path.join(s["dir"], "eval.json")) as f:
            e = json.load(f)
        phase = s["init_from"]
        k = e["samples"]
        rows.append({"phase": phase, "pass@1": e["pass@1"], "stderr/pass@1": e["stderr/pass@1"],
                     f"pass@{k}": e.get(f"pass@{k}"), "k": k, "format": e["format"], "mean_length": e["mean_length"],
                     "problems": e["problems"], "wall_s": records[phase]["wall_s"], "cpu_s": records[phase]["cpu_s"]})
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"rows": rows, "phases": list(records.values())}, f, indent=1)
    if rows:
        k = rows[0]["k"]
        print(f"\n[r1] held-out accuracy ({rows[0]['problems']} problems x {k} samples; {out}/summary.json)")
        print(f"| phase | pass@1 | pass@{k} | format | mean length | phase wall s | phase CPU s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['phase']} | {r['pass@1']:.3f} ± {r['stderr/pass@1']:.3f} | {r[f'pass@{k}']:.3f} | "
                  f"{r['format']:.2f} | {r['mean_length']:.1f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    return rows


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        phase, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise ChainError(f"--set {item!r}: must be PHASE:KEY=VALUE (PHASE a phase name, 'eval' or 'all')")
        out.setdefault(phase, []).append(override)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain", default=os.path.join(ROOT, "configs", "r1", "tiny.yaml"), help="the chain file")
    parser.add_argument("--out", default=None, help="output directory (default runs/r1_<chain name>)")
    parser.add_argument("--set", action="append", default=[], metavar="PHASE:KEY=VALUE",
                        help="an extra Hydra override of one phase ('eval': the evaluations, 'all': every run)")
    parser.add_argument("--list", action="store_true", help="print the phases and their commands, run nothing")
    args = parser.parse_args()
    try:
        chain = load_chain(args.chain)
        extra = parse_sets(args.set)
        names = {p["name"] for p in chain["phases"]} | {"eval", "all"}
        bad = sorted(set(extra) - names)
        if bad:
            raise ChainError(f"--set names unknown phase(s) {bad}; phases: {', '.join(sorted(names))}")
        out = os.path.abspath(args.out or os.path.join("runs", "r1_" + os.path.splitext(os.path.basename(args.chain))[0]))
        steps = plan(chain, out, extra)
        if args.list:
            for s in steps:
                print(f"{s['name']}: {' '.join(s['command'][1:])}")
            return
        check_evaluations(steps)
        os.makedirs(out, exist_ok=True)
        records = {}
        for i, s in enumerate(steps, start=1):
            records[s["name"]] = run_step(s, i, len(steps))
        summary(steps, records, out)
    except (ChainError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
