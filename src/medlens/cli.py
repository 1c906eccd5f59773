"""`medlens` command line: train | evaluate | predict | segment | explain | models | recipes | data | run | serve | keys | audit.

User mistakes surface as one message (no traceback) and exit code 2; unexpected failures print one line and
keep the full traceback in a file, so a user never has to read a stack to learn what to do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path

from medlens import rundir
from medlens.errors import MedlensError

DEFAULT_DATASET = "chest_xray"


def _auto_recipe(data: str) -> str:
    import torch

    from medlens.seg.data import is_segmentation_data

    if is_segmentation_data(data):
        return "lung_unet"
    if str(data).endswith(".npz"):
        return "medmnist"
    return "cxr_gpu" if torch.cuda.is_available() else "cxr_cpu"


def _resolve_data(data: str | None, default_name: str = DEFAULT_DATASET) -> Path:
    """A path the user gave, or a known data set name resolved to a local copy / the download cache."""
    from medlens.data.download import DATASETS, resolve_dataset

    if data and (Path(data).exists() or data not in DATASETS):
        path = Path(data)
        if not path.exists():
            raise MedlensError(f"data path '{data}' does not exist",
                               hint="give an image folder (CLASS/*.png or train|val|test/CLASS/*), a CSV "
                                    f"(path,label[,patient_id]), a .npz, or a data set name: {', '.join(DATASETS)}")
        return path
    return Path(resolve_dataset(data or default_name, data_arg=None))


def cmd_train(args: argparse.Namespace) -> int:
    from medlens.config import load_config
    from medlens.train import fit

    data = _resolve_data(args.data)
    run = Path(args.out)
    if args.resume and rundir.is_run(run):
        from medlens.config import apply_overrides

        cfg = apply_overrides(rundir.run_config(run), args.set)
    else:
        cfg = load_config(args.recipe if args.recipe != "auto" else _auto_recipe(str(data)), args.set)
    if args.strict:
        cfg.data.strict = True
    if args.ensemble is not None:
        cfg.train.ensemble = args.ensemble
    if _is_segmentation(cfg, data):
        from medlens.seg.train import fit_segmentation

        card = fit_segmentation(cfg, data, run, resume=args.resume, progress=not args.no_progress)
        print(json.dumps({"run": str(run), "model_id": card.model_id, "task": card.task, "best_epoch": card.epoch,
                          "val_dice_mean": card.metrics["val"]["dice_mean"],
                          "val_dice_median": card.metrics["val"]["dice_median"],
                          "postprocess": card.metrics["postprocess"]["chosen"]}))
        return 0
    card = fit(cfg, data, run, resume=args.resume, progress=not args.no_progress)
    print(json.dumps({"run": str(run), "model_id": card.model_id, "best_epoch": card.epoch,
                      "val_auc": card.metrics.get("val", {}).get("auc"), "threshold": card.threshold}))
    return 0


def _is_segmentation(cfg, data: Path) -> bool:
    """Whether this is a segmentation run; a segmentation model on class folders (or the reverse) is refused."""
    from medlens.errors import ConfigError
    from medlens.models import model_task
    from medlens.seg.data import is_segmentation_data

    seg_model = model_task(cfg.model.name) == "segmentation"
    seg_data = is_segmentation_data(data)
    if seg_model != seg_data:
        raise ConfigError(
            f"model '{cfg.model.name}' is a {'segmentation' if seg_model else 'classification'} model but {data} "
            f"is {'a segmentation data set (images/ + masks/)' if seg_data else 'not a segmentation data set'}",
            hint="use --recipe lung_unet (or a segmentation model) for images/ + masks/ folders, a classification "
                 "recipe for class folders; `medlens models` lists both kinds")
    return seg_model


def _run_task(run: str) -> str:
    from medlens.models.card import CARD_SUFFIX, ModelCard

    card = Path(run) / f"model{CARD_SUFFIX}"
    return ModelCard.load(card).task if card.is_file() else "classification"  # evaluate explains a missing card


def cmd_recalibrate(args: argparse.Namespace) -> int:
    from medlens.train import recalibrate

    card = recalibrate(args.run, _resolve_data(args.data), overrides=args.set, progress=not args.no_progress)
    change = card.policy_changes[-1] if card.policy_changes else {}
    print(json.dumps({"run": str(args.run), "model_id": card.model_id, "policy_hash": card.policy_hash,
                      "temperature": card.temperature, "threshold": card.threshold, "refer": card.refer,
                      "after_test_look": bool(change.get("after_test_look"))}))  # train logs the note
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medlens.evaluate import evaluate

    data = _resolve_data(args.data)
    if _run_task(args.run) == "segmentation":
        return _evaluate_segmentation(args, data)
    backend = getattr(args, "backend", "torch")
    result = evaluate(args.run, data, args.split, progress=not args.no_progress, n_bootstrap=args.bootstrap,
                      masks=getattr(args, "masks", None), trust=not getattr(args, "no_trust", False), backend=backend)
    out = rundir.eval_dir(args.run, rundir.eval_name(args.split, backend))
    keys = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "pr_auc", "ece")
    print(f"{args.split}: n={result['n']}  threshold={result['threshold']:.4f}")
    for k in keys:
        m = result[k]
        print(f"  {k:<12} {m['value']:.4f}  (95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f})")
    dom = result.get("domain") or {}
    if dom:
        ood, silent = dom["out_of_domain"], dom["silent_error"]
        print(f"  out of domain {ood['k']} of {ood['n']}; silent errors (wrong, in domain, not referred) "
              f"{silent['k']} of {silent['n']}")
    unc = result.get("uncertainty") or {}
    for method, m in unc.get("methods", {}).items():
        print(f"  refer/{method:<9} accuracy {m['accuracy']:.4f} -> {m['accuracy_kept']:.4f} on the "
              f"{unc['coverage']:.0%} most certain ({100 * m['gain']:+.1f} pts)")
    faith = result.get("faithfulness")
    if faith:
        print(f"  {faith['method']}: deletion AUC {faith['deletion_auc']:.3f} (random {faith['deletion_auc_random']:.3f}),"
              f" randomisation Spearman median {faith['randomisation_spearman_median']}")
    print(f"report: {out / 'report.html'}")
    return 0


def _evaluate_segmentation(args: argparse.Namespace, data: Path) -> int:
    from medlens.seg.evaluate import evaluate_segmentation

    result = evaluate_segmentation(args.run, data, args.split, n_bootstrap=args.bootstrap)
    print(f"{args.split}: n={result['n']} images of {result['n_patients']} patients, post-processing "
          f"{result['postprocess']}; distances in {result['units']['distances']}")
    for name, m in result["metrics"].items():
        mean, median = m["mean"], m["median"]
        print(f"  {name:<8} mean {mean['value']:.4f} ({mean['ci_low']:.4f}-{mean['ci_high']:.4f})  "
              f"median {median['value']:.4f} ({median['ci_low']:.4f}-{median['ci_high']:.4f})"
              + (f"  [{m['n_missing']} missing]" if m["n_missing"] else ""))
    print(f"report: {rundir.eval_dir(args.run, args.split) / 'report.html'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from medlens.export import export_dir, export_run

    card = export_run(args.run, _resolve_data(args.data), int8=args.int8, calibration=args.calibration,
                      opset=args.opset, progress=not args.no_progress)
    parity = card["parity"]
    print(f"exported {card['source']['model_id']} to {export_dir(args.run)} (opset {card['opset']}, "
          f"{card['seconds']:.1f} s)")
    print(f"  onnx       {card['files']['onnx']['bytes'] / 1e6:.2f} MB; max |logit - torch| "
          f"{parity['fp32_max_abs_logit_diff']:.2e} on {parity['n']} validation images; val AUC "
          f"{parity['onnx']['auc']:.4f} (torch {parity['torch']['auc']:.4f})")
    if "onnx-int8" in card["files"]:
        print(f"  onnx-int8  {card['files']['onnx-int8']['bytes'] / 1e6:.2f} MB; val AUC "
              f"{parity['onnx-int8']['auc']:.4f}, accuracy {parity['onnx-int8']['accuracy']:.4f} (fp32 "
              f"{parity['onnx']['accuracy']:.4f}); calibrated on {card['calibration']['n']} training images")
    if parity.get("warning"):
        print(f"  warning: {parity['warning']}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from medlens.compress import prune_run

    card = prune_run(args.run, _resolve_data(args.data), args.out, sparsity=args.sparsity,
                     structured=args.structured, epochs=args.epochs, progress=not args.no_progress)
    p = card.metrics["pruned_from"]
    what = (f"widths {p['widths'][0]} -> {p['widths'][1]}, {p['macs'][0] / 1e6:.1f}M -> {p['macs'][1] / 1e6:.1f}M MACs"
            if "widths" in p else f"{p['zero_share_of_pruned_weights']:.0%} of conv / linear weights at zero "
                                  "(same size and speed: use --structured for a smaller network)")
    print(f"pruned {p['model_id']} -> {card.model_id} in {args.out}: {what}; val AUC {card.metrics['val']['auc']:.4f} "
          f"after {args.epochs} fine-tuning epochs")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from medlens.compress import distill_run

    try:
        student_args = json.loads(args.student_args) if args.student_args else {}
    except ValueError as exc:
        raise MedlensError(f"--student-args is not JSON ({exc})", hint='e.g. --student-args \'{"widths": [8, 16, 32, 64]}\'') from None
    card = distill_run(args.teacher, _resolve_data(args.data), args.out, student=args.student,
                       student_args=student_args, epochs=args.epochs, temperature=args.temperature, alpha=args.alpha,
                       progress=not args.no_progress)
    d = card.metrics["distilled_from"]
    print(f"distilled {d['model_id']} ({d['macs']['teacher'] / 1e6:.1f}M MACs) into {card.model_id} "
          f"({d['macs']['student'] / 1e6:.1f}M MACs) in {args.out}; val AUC {card.metrics['val']['auc']:.4f}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from medlens.seg.predict import segment_files, to_json_lines

    results = segment_files(args.run, args.files, args.out, device=args.device)
    print(to_json_lines(results))
    return 1 if any("error" in r for r in results) else 0


def _default_masks() -> Path | None:
    """The shared lung-mask set beside the project, if there is one (used by `medlens run`)."""
    from medlens.data.download import _shared_data_roots

    env = os.environ.get("MEDLENS_SHARED_DATA")
    roots = ([Path(env)] if env else []) + _shared_data_roots(None)
    return next((r / "segmentation" for r in roots if (r / "segmentation" / "manifest.csv").is_file()), None)


def cmd_predict(args: argparse.Namespace) -> int:
    from medlens.inference import Predictor, to_json_lines

    predictor = Predictor.from_run(args.run, device=args.device, backend=args.backend)
    results = predictor.predict(args.files, uncertainty=args.uncertainty)
    print(to_json_lines(results))
    return 1 if any("error" in r for r in results) else 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Heat map of where the model looked, over the original image (PNG), plus the map as .npy if asked."""
    import numpy as np

    from medlens.data.readers import read_image
    from medlens.explain import save_overlay
    from medlens.forward import shown_class
    from medlens.inference import Predictor
    from medlens.models.card import normalize_batch

    predictor = Predictor.from_run(args.run, device=args.device)
    card = predictor.card
    image, _meta = read_image(args.file)
    batch = predictor.prepare(image)
    x = normalize_batch(batch.to(predictor.device), card.intensity)
    prob = float(predictor.predict_images(batch)[0])
    # Explain the label the user is shown (at the card's operating threshold), not the arg-max class.
    target = args.target
    if target is None:
        target = int(shown_class(prob, card.threshold, card.positive_class))
    result = predictor.explain(x, args.method, target=target)
    cam = result.maps[0].detach().cpu().numpy()
    out = Path(args.out) if args.out else Path(f"{Path(args.file).stem}.{args.method}.png")
    save_overlay(out, image, cam, alpha=args.alpha)
    if args.array:
        np.save(out.with_suffix(".npy"), cam.astype(np.float32))
    target = int(result.targets[0])
    print(json.dumps({"path": str(args.file), "method": args.method, "overlay": str(out),
                      "explained_class": card.class_names[target], "probability": round(prob, 6),
                      "threshold": round(card.threshold, 6), "model_id": card.model_id}))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from medlens.models import list_models, model_info

    for name in list_models(args.pattern):
        info = model_info(name)
        print(f"{name:<18} {info.get('description', '')}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from medlens.config import list_recipes, load_config

    for name in list_recipes():
        cfg = load_config(name)
        print(f"{name:<12} {cfg.model.name:<16} {cfg.data.image_size:>4}px  {cfg.train.epochs:>3} epochs  "
              f"{cfg.description}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from medlens.data.download import DATASETS, download_dataset
    from medlens.errors import ConfigError

    if args.action == "list":
        for name, spec in DATASETS.items():
            print(f"{name:<16} {spec.description}")
        return 0
    if args.name not in DATASETS:
        raise ConfigError(f"unknown data set '{args.name}'", hint=f"known: {', '.join(DATASETS)}")
    spec = DATASETS[args.name]
    # fetch fills the download cache (checksummed, resumable) even where a local copy exists elsewhere
    print(download_dataset(spec))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: obtain the data, train the default recipe, evaluate on the official test split once."""
    from medlens.config import load_config
    from medlens.train import fit

    data = _resolve_data(args.data)
    recipe = args.recipe if args.recipe != "auto" else _auto_recipe(str(data))
    cfg = load_config(recipe, args.set)
    run = Path(args.out) if args.out else Path("runs") / f"{Path(data).name}-{recipe}"
    print(f"medlens: training recipe '{recipe}' on {data} -> {run}", file=sys.stderr)
    fit(cfg, data, run, progress=not args.no_progress)
    ns = argparse.Namespace(run=str(run), data=str(data), split="test", no_progress=args.no_progress,
                            bootstrap=None, masks=_default_masks(), no_trust=False)
    return cmd_evaluate(ns)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run over HTTP: the REST API, the web viewer, health and metrics (one process)."""
    try:
        import uvicorn

        from medlens.service.app import create_app
        from medlens.service.settings import ServiceSettings
        from medlens.service.transport import uvicorn_options
    except ImportError as exc:
        raise MedlensError(f"the service needs packages that are not installed ({exc.name})",
                           hint="pip install 'medlens[service]'") from exc
    from medlens.models.card import _find_card
    from medlens.rundir import existing_run

    run = existing_run(args.run)
    _find_card(run)  # no card: one clear message now rather than a failed start-up later
    settings = ServiceSettings.load(run, database=args.db)
    if getattr(args, "workers", 1) > 1:
        return _serve_workers(args, run, settings)
    app = create_app(run, settings, batching=not args.no_batching, backend=args.backend)
    print(f"medlens: serving {run} on http://{args.host}:{args.port} (API docs at /docs; "
          f"{'micro-batching' if not args.no_batching else 'no batching'}); create keys with "
          "`medlens keys create NAME --role clinician --db ...`", file=sys.stderr)
    # uvicorn_options: the header timeout (slow clients), keep-alive, header size and trusted proxies of settings
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10,
                access_log=not getattr(args, "no_access_log", False), **uvicorn_options(settings))
    return 0


def _serve_workers(args: argparse.Namespace, run: Path, settings) -> int:
    """``--workers N``: N server processes on one port (uvicorn's supervisor), each with its own model and audit
    writer, all on the one audit database (SQLite in WAL mode across processes, or PostgreSQL), so every process
    keeps the audit guarantees (docs/AUDIT.md). The app is built in each process from the environment."""
    import uvicorn

    from medlens.service.app import SERVE_ENV
    from medlens.service.transport import uvicorn_options

    if settings.database_url.startswith("sqlite") and ":memory:" in settings.database_url:
        raise MedlensError("--workers needs an audit database on disk or PostgreSQL, not an in-memory SQLite one")
    from medlens.service.audit import AuditLog
    from medlens.service.auth import KeyStore

    # create the tables once, here, before N processes start (two creating them at once would race)
    AuditLog(settings.database_url).close()
    KeyStore(settings.database_url).close()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.update({SERVE_ENV["run"]: str(run.resolve()), SERVE_ENV["database"]: settings.database_url,
                       SERVE_ENV["batching"]: "0" if args.no_batching else "1",
                       SERVE_ENV["model_workers"]: str(max(1, cores // args.workers)),
                       SERVE_ENV["backend"]: args.backend})
    print(f"medlens: serving {run} on http://{args.host}:{args.port} with {args.workers} processes sharing "
          f"{settings.database_url.split('://')[0]} audit database", file=sys.stderr)
    options = {"log_level": "info", "timeout_graceful_shutdown": 10,
               "access_log": not getattr(args, "no_access_log", False), **uvicorn_options(settings)}
    from medlens.service.workers import reuse_port_supported, serve_workers

    if reuse_port_supported():  # a socket per process, so connections spread over them (service/workers.py)
        return serve_workers(args.workers, args.host, args.port, dict(os.environ), options)
    uvicorn.run("medlens.service.app:app_from_env", factory=True, workers=args.workers, host=args.host,
                port=args.port, **options)
    return 0


#: medlens.export.BACKENDS (not imported here: that would load torch for every command)
BACKENDS = ("torch", "onnx", "onnx-int8")
BACKEND_HELP = ("torch (default: the run's weights), onnx or onnx-int8 (ONNX Runtime on the CPU; make them with "
                "`medlens export RUN --data DATA [--int8]`)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medlens", description="CNNs for medical imaging: train, evaluate, predict.")
    p.add_argument("--version", action="version", version=f"medlens {__import__('medlens').__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model on DATA into a run directory")
    t.add_argument("data", metavar="DATA", help="image folder, CSV (path,label[,patient_id]), MedMNIST .npz, "
                                                "or a data set name (see `medlens data list`)")
    t.add_argument("--out", required=True, metavar="RUN", help="run directory to write")
    t.add_argument("--recipe", default="auto", help="recipe name or YAML file (`medlens recipes`); auto picks "
                                                    "by device and data")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, "
                                                                                   "e.g. train.epochs=5")
    t.add_argument("--resume", action="store_true", help="continue from RUN/last.ckpt")
    t.add_argument("--strict", action="store_true", help="stop on the first unreadable image")
    t.add_argument("--ensemble", type=int, default=None, metavar="K",
                   help="train a deep ensemble of K members (seeds seed..seed+K-1) into one run")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a run on a split and write metrics.json + report.html")
    e.add_argument("run", metavar="RUN")
    e.add_argument("--data", required=True, metavar="DATA")
    e.add_argument("--split", default="test", help="test (default), val, train or all (every row: external "
                   "validation); test on data with no split information that the run was not trained on means all")
    e.add_argument("--bootstrap", type=int, default=None, metavar="N", help="bootstrap resamples for the CIs")
    e.add_argument("--masks", default=None, metavar="DIR", help="chest X-rays with lung masks (manifest.csv with "
                   "image,mask, or images/ + masks/): report the share of heat-map energy inside the lungs")
    e.add_argument("--no-trust", action="store_true", help="skip uncertainty, referral and explanation checks")
    e.add_argument("--backend", default="torch", choices=BACKENDS, help=BACKEND_HELP + "; results go to "
                   "RUN/eval/SPLIT-BACKEND")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    rc2 = sub.add_parser("recalibrate", help="refit temperature, threshold, referral policy and in-domain score "
                                             "of a run on its own data split (weights unchanged)")
    rc2.add_argument("run", metavar="RUN")
    rc2.add_argument("--data", required=True, metavar="DATA")
    rc2.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. eval.refer_coverage=0.8")
    rc2.add_argument("--no-progress", action="store_true")
    rc2.set_defaults(func=cmd_recalibrate)

    r = sub.add_parser("predict", help="predict PNG / JPEG / DICOM files; one JSON object per file")
    r.add_argument("run", metavar="RUN")
    r.add_argument("files", nargs="+", metavar="FILE")
    r.add_argument("--device", default="auto")
    r.add_argument("--backend", default="torch", choices=BACKENDS, help=BACKEND_HELP)
    # the methods are medlens.uncertainty.UNCERTAINTY_METHODS, checked by Predictor.predict (importing them
    # here would load torch for every command, `medlens --help` included)
    r.add_argument("--uncertainty", default=None, metavar="METHOD",
                   help="softmax (the single pass, default), mc (MC-dropout passes), tta (test-time "
                        "augmentation passes) or ensemble (the members of an ensemble run)")
    r.set_defaults(func=cmd_predict)

    sg = sub.add_parser("segment", help="segment images with a segmentation run: mask PNGs, overlays, JSON")
    sg.add_argument("run", metavar="RUN")
    sg.add_argument("files", nargs="+", metavar="FILE")
    sg.add_argument("--out", required=True, metavar="DIR", help="folder for <name>.mask.png and <name>.overlay.png")
    sg.add_argument("--device", default="auto")
    sg.set_defaults(func=cmd_segment)

    x = sub.add_parser("explain", help="heat map of where the model looked (Grad-CAM family, occlusion)")
    x.add_argument("run", metavar="RUN")
    x.add_argument("file", metavar="FILE")
    x.add_argument("--method", default="gradcam", help="gradcam, gradcam++, scorecam or occlusion")
    x.add_argument("--out", default=None, metavar="PNG", help="overlay to write (default FILE-stem.METHOD.png)")
    x.add_argument("--target", type=int, default=None, help="class index to explain (default: the predicted one)")
    x.add_argument("--alpha", type=float, default=0.4, help="heat-map opacity in the overlay")
    x.add_argument("--array", action="store_true", help="also write the map as a .npy array beside the PNG")
    x.add_argument("--device", default="auto")
    x.set_defaults(func=cmd_explain)

    m = sub.add_parser("models", help="list the registered architectures")
    m.add_argument("pattern", nargs="?", default="*")
    m.set_defaults(func=cmd_models)

    rc = sub.add_parser("recipes", help="list the training recipes")
    rc.set_defaults(func=cmd_recipes)

    d = sub.add_parser("data", help="public data sets: list, or fetch (checksummed, cached, resumable)")
    d.add_argument("action", choices=["list", "fetch"])
    d.add_argument("name", nargs="?", default=DEFAULT_DATASET)
    d.set_defaults(func=cmd_data)

    main_job = sub.add_parser("run", help="the main job: get chest X-rays, train, evaluate on test, write report")
    main_job.add_argument("--data", default=None, help="local copy of the data (default: find or download "
                                                       f"'{DEFAULT_DATASET}')")
    main_job.add_argument("--out", default=None, metavar="RUN")
    main_job.add_argument("--recipe", default="auto")
    main_job.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    main_job.add_argument("--no-progress", action="store_true")
    main_job.set_defaults(func=cmd_run)

    sv = sub.add_parser("serve", help="serve a run: REST API, web viewer, audit trail, health and metrics")
    sv.add_argument("run", metavar="RUN", help="run directory of a trained model")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                        "only; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--db", default=None, metavar="URL", help="audit / key database: URL or SQLite file (default: "
                                                              "MEDLENS_DATABASE_URL, else RUN/audit.db)")
    sv.add_argument("--workers", type=int, default=1, metavar="N",
                    help="server processes (default 1); they share the audit database (SQLite WAL or PostgreSQL)")
    sv.add_argument("--backend", default="torch", choices=BACKENDS, help=BACKEND_HELP)
    sv.add_argument("--no-batching", action="store_true",
                    help="one forward pass per request instead of micro-batching (for comparison)")
    sv.add_argument("--no-access-log", action="store_true",
                    help="do not log each HTTP request to stderr (the audit trail records every /v1 request anyway)")
    sv.set_defaults(func=cmd_serve)

    ex = sub.add_parser("export", help="export a run to ONNX (and INT8) with a parity check: RUN/export/")
    ex.add_argument("run", metavar="RUN")
    ex.add_argument("--data", required=True, metavar="DATA",
                    help="the data the run was trained on: validation images check parity, training images "
                         "calibrate INT8 (never test)")
    ex.add_argument("--format", default="onnx", choices=["onnx"], help="onnx (the one format built)")
    ex.add_argument("--int8", action="store_true", help="also write model.int8.onnx (static QDQ quantisation)")
    ex.add_argument("--calibration", type=int, default=256, metavar="N",
                    help="training images that calibrate the INT8 ranges (default 256)")
    ex.add_argument("--opset", type=int, default=17)
    ex.add_argument("--no-progress", action="store_true")
    ex.set_defaults(func=cmd_export)

    pr = sub.add_parser("prune", help="structured channel pruning of a run + a short fine-tune: a smaller run")
    pr.add_argument("run", metavar="RUN")
    pr.add_argument("--data", required=True, metavar="DATA", help="the data the run was trained on (same split)")
    pr.add_argument("--out", required=True, metavar="NEW_RUN")
    pr.add_argument("--sparsity", type=float, required=True, metavar="S", help="share of channels removed (0-1)")
    pr.add_argument("--structured", action="store_true", help="remove channels: a narrower, faster network "
                    "(default: zero the smallest weights, global L1, same size)")
    pr.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_prune)

    ds = sub.add_parser("distill", help="train a smaller student on a teacher run's soft targets and the labels")
    ds.add_argument("teacher", metavar="TEACHER_RUN")
    ds.add_argument("--student", required=True, metavar="NAME", help="a registered architecture (medlens models)")
    ds.add_argument("--student-args", default="", metavar="JSON", help='its options, e.g. \'{"widths": [8, 16, 32, 64]}\'')
    ds.add_argument("--data", required=True, metavar="DATA", help="the teacher's data (same split)")
    ds.add_argument("--out", required=True, metavar="NEW_RUN")
    ds.add_argument("--epochs", type=int, default=None, help="default: the teacher's")
    ds.add_argument("--temperature", type=float, default=4.0)
    ds.add_argument("--alpha", type=float, default=0.7, help="weight of the teacher term (1 - alpha: labels)")
    ds.add_argument("--no-progress", action="store_true")
    ds.set_defaults(func=cmd_distill)

    from medlens.service.commands import add_commands

    add_commands(sub)  # keys create|list|revoke, audit export
    from medlens.pacs.commands import add_commands as add_dicom_commands

    add_dicom_commands(sub)  # dicom listen
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Warnings (skipped files, leakage) always reach the terminal; progress details with -v.
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("medlens: %(message)s"))
    console.setLevel(logging.INFO if args.verbose else logging.WARNING)
    logger = logging.getLogger("medlens")
    logger.setLevel(logging.INFO)
    logger.addHandler(console)
    try:
        return args.func(args)
    except MedlensError as exc:
        print(f"medlens: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("medlens: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user mistake: one line here, the traceback in a file
        if os.environ.get("MEDLENS_DEBUG"):
            raise
        fd, path = tempfile.mkstemp(prefix="medlens-crash-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(traceback.format_exc())
        print(f"medlens: internal error: {type(exc).__name__}: {exc}\n  the full traceback is in {path}; "
              "please report it", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(console)


if __name__ == "__main__":
    sys.exit(main())
