"""TransPrune demo: baseline vs pruned, side by side. `python app.py --help` for the flags.

This file only lays out the pieces from components/ and wires their events; every handler lives
in a component module. Environment variables (for Hugging Face Spaces) mirror the flags:
TRANSPRUNE_MODEL, TRANSPRUNE_HOST, TRANSPRUNE_PORT, TRANSPRUNE_SHARE, TRANSPRUNE_ALLOWED_MODELS,
TRANSPRUNE_DEVICE, TRANSPRUNE_THREADS, TRANSPRUNE_MAX_UPLOAD. On a Space (SPACE_ID is set) the
dropdown is restricted to the registry.
"""

from __future__ import annotations

try:  # ZeroGPU Spaces: `spaces` must be imported before anything touches CUDA
    import spaces  # noqa: F401
except ImportError:
    pass

import argparse
import os
import threading
from dataclasses import dataclass

import gradio as gr
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from components import (answers, downloads, engine, examples, files, frontier, health, inputs, metrics, notes, overlay,
                        speed, theme)
from components.errors import log
from components.gate import GatedBlocks
from components.compare import CompareOutputs, ErrorInbox, make_handlers, make_speed_handler, make_speed_lookup

GPU_QUEUE = "gpu"        # one concurrency id for everything that touches the model
# The real-size timing builds its own model: its own queue, so a visitor timing schedules (30 s each on
# a CPU) never holds up anyone's /compare.
SPEED_QUEUE = "real-size"
QUEUE_SIZE = 16          # requests waiting beyond this are refused with "queue full"
# Sessions whose state (the last run, for the overlay clicks) stays in memory; the least recently
# used beyond this are dropped (their next patch click asks for a new run). ~0.2 MB each.
STATE_SESSIONS = 64
# Runs in the browser when Run is pressed: on a narrow screen, scroll the result area into view
# (the inputs are below it there); the arguments go through unchanged.
SCROLL_TO_RESULT = """(...args) => {
  if (window.innerWidth < 700) { document.querySelector('#verdict')?.scrollIntoView({behavior: 'smooth'}); }
  return args;
}"""


@dataclass
class App:
    demo: gr.Blocks
    engine: engine.Engine
    default_model: str


def build_demo(model: str | None = "auto", allowed_models: tuple[str, ...] | None = None,
               device: str | None = None, self_check: health.StartupCheck | None = None,
               queue_size: int = QUEUE_SIZE) -> App:
    """Build the Blocks. `model` is preloaded (falling back to an offline model if it cannot load).

    `self_check` defaults to the process's one background installation check (transprune.doctor).
    """
    self_check = self_check or health.startup_check()
    eng = engine.Engine(engine.Settings(allowed_models=allowed_models, device=device))
    default = eng.default_model(model)
    errors = ErrorInbox()
    compare, load_model = make_handlers(eng, default, errors)
    show_speed = make_speed_lookup(eng)

    # GatedBlocks: every event's raw inputs pass the app's checks first (files only from the upload
    # folder, values within the components' bounds, a sentence for each refusal): components/gate.py.
    with GatedBlocks(title="TransPrune: baseline vs pruned", delete_cache=(1800, 3600),
                     file_checks={gr.Image: inputs.image_header_problem, gr.Video: inputs.video_header_problem},
                     explain=inputs.explain_refusal) as demo:
        notes.build_header()
        health_warning = health.build()
        state = gr.State(None)
        # The hero (answers, what it cost, what it kept) comes first: left on a desktop, on top on a
        # phone, where the inputs follow it. Examples and the detailed panels come after.
        with gr.Row(equal_height=False, elem_id="hero-row"):
            with gr.Column(scale=3, min_width=300, elem_id="hero"):
                ans = answers.build()
                with gr.Row(equal_height=False, elem_id="view-row"):
                    with gr.Column(scale=5, min_width=280):
                        inspect, segment, patch_note = overlay.build_view()
                    with gr.Column(scale=4, min_width=240):
                        real_size = speed.build(show_speed(default))
                notes.build_what_you_see()
                status = gr.Markdown("", elem_classes=["run-status"], elem_id="run-status")
            with gr.Column(scale=2, min_width=300, elem_id="inputs"):
                ins = inputs.build(eng, default)
        examples.build(ins.image, ins.question, ins.method, ins.budget, ins.model, default)
        examples.build_video(ins.image, ins.video, ins.question, ins.model, eng.video_example_model())
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=300):
                table = metrics.build_table()
                dl = downloads.build()
            with gr.Column(scale=2, min_width=300):
                chart = metrics.build_chart()
                patch_table = overlay.build_patch_table()
        gal = overlay.build_galleries()
        frontier_text, frontier_figure = frontier.build()
        notes.build_measurement()

        # ------------------------------------------------------------------ wiring
        demo.load(self_check.banner, outputs=health_warning, api_visibility="private", concurrency_limit=None,
                  show_progress="hidden")
        outputs = CompareOutputs(
            verdict=ans.verdict, status=status, baseline=ans.baseline, pruned=ans.pruned, table=table, chart=chart,
            stages=gal.stages, inspect=inspect, segment=segment, patch_note=patch_note, patch_table=patch_table,
            heat_stage=gal.heat_stage, heatmaps=gal.heatmaps, trace=dl.trace, card=dl.card, preview=dl.preview,
            state=state)
        run_outputs = list(outputs)
        # Progress (and a failure's status) on the verdict only; the error sentence then replaces the
        # verdict's text (ErrorInbox) and stays there until the next run, the rest of the result emptied.
        # On a phone the inputs sit below the result: bring the result into view when a run starts.
        run = gr.on([ins.run.click, ins.question.submit], compare, inputs=ins.run_inputs(), outputs=run_outputs,
                    api_name="compare", concurrency_id=GPU_QUEUE, concurrency_limit=1, show_progress_on=[ans.verdict],
                    js=SCROLL_TO_RESULT)
        run.failure(errors.show, inputs=ins.image,
                    outputs=[ans.verdict, *(getattr(outputs, name) for name in ErrorInbox.CLEARED)],
                    preprocess=False, api_visibility="private", queue=False, show_progress="hidden")
        real_size.run.click(make_speed_handler(eng), inputs=[*ins.schedule_inputs(), state],
                            outputs=[real_size.result, ans.verdict],
                            api_name="speed_at_real_size", concurrency_id=SPEED_QUEUE, concurrency_limit=1,
                            show_progress_on=[real_size.result])
        ins.model.change(load_model, inputs=[ins.model, ins.dtype, ins.attn], outputs=ins.model_info,
                         concurrency_id=GPU_QUEUE, concurrency_limit=1, api_visibility="private")
        # The speed panel follows the settings: the chosen schedule's figure, never another's.
        gr.on([demo.load, ins.model.change, ins.method.change, ins.budget.change, ins.keep_ratio.change,
               ins.alpha.change, ins.layers.change], show_speed, inputs=ins.schedule_inputs(), outputs=real_size.result,
              api_visibility="private", queue=False, show_progress="hidden")
        gr.on([demo.load, ins.model.change], frontier.show, inputs=ins.model, outputs=[frontier_text, frontier_figure],
              api_visibility="private", queue=False, show_progress="hidden")
        ins.budget.change(inputs.on_budget, ins.budget, ins.keep_ratio, api_visibility="private", queue=False)
        # One medium at a time: a video replaces the image (and shows its tab), an uploaded image the video.
        ins.video.change(inputs.on_video, ins.video, [ins.tabs, ins.image], api_visibility="private", queue=False,
                         show_progress="hidden")
        ins.image.change(inputs.on_image, ins.image, ins.video, api_visibility="private", queue=False,
                         show_progress="hidden", preprocess=False)
        ins.method.change(inputs.on_method, ins.method, [ins.alpha, ins.budget, ins.layers], api_visibility="private",
                          queue=False)
        # .input, not .change: only a presenter's choice re-renders (a run sets these values itself).
        gal.heat_stage.input(overlay.on_heat_stage, [state, gal.heat_stage], gal.heatmaps, api_visibility="private")
        segment.input(overlay.on_segment, [state, segment], inspect, api_visibility="private")
        inspect.select(overlay.on_patch_click, [state, segment], [inspect, patch_note, patch_table],
                       api_visibility="private")
    # api_open=False: an event that runs on the queue cannot be called around it (POST /gradio_api/run/...),
    # so the queue's size and the concurrency limits hold for every client. Gradio closes these routes on a
    # Space by itself; a local or self-hosted server needs it said.
    demo.queue(max_size=queue_size, default_concurrency_limit=2, api_open=False)
    files.STORE.keep = lambda: files.gradio_keeps(demo)   # trimming the cache never removes the examples
    return App(demo=demo, engine=eng, default_model=default)


def launch_kwargs(args) -> dict:
    """Everything launch() needs apart from the Blocks: server, theme, upload cap, error policy.

    show_error=False: the handlers' and the request gate's sentences (gr.Error) still reach the page
    and API clients, but an exception raised inside Gradio is not sent as text: those messages name
    server paths and library internals (the gate turns them into gate.UNREADABLE_REQUEST); a request
    FastAPI cannot parse gets a sentence, not pydantic's raw report. Every upload is preceded by a
    trim of the cache (files.TrimBeforeUpload) and refused while it is full, so uploads alone never fill the disk.
    """
    from starlette.middleware import Middleware

    return dict(server_name=args.host, server_port=args.port, share=args.share, theme=theme.theme(), css=theme.CSS,
                head=theme.HEAD, max_file_size=args.max_upload, show_error=False, footer_links=["api", "gradio"],
                state_session_capacity=STATE_SESSIONS,
                app_kwargs=dict(exception_handlers={RequestValidationError: unreadable_request,
                                                    StarletteHTTPException: unparsable_body,
                                                    KeyError: unknown_event},
                                middleware=[Middleware(files.TrimBeforeUpload, store=files.STORE)]))


async def unreadable_request(request, error):
    """FastAPI's handler for a request body it cannot validate: one sentence, no pydantic internals."""
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=422, content={
        "error": "This request is not what the API expects. Send JSON like {\"data\": [...]} with one value per "
                 "input, as shown on the page's \"Use via API\" link (or use gradio_client)."})


async def unknown_event(request, error):
    """An event number (fn_index) the app does not have fails inside Gradio's routing with a KeyError, before any
    app code runs, and Starlette would answer a bare "Internal Server Error": a sentence instead."""
    from fastapi.responses import JSONResponse

    log.info("request for something the app does not have: %s %r", request.url.path, error)
    return JSONResponse(status_code=404, content={
        "error": "This request names an event the app does not have. Use the endpoints listed on the page's "
                 "\"Use via API\" link (or gradio_client)."})


async def unparsable_body(request, error):
    """FastAPI answers a body its JSON parser gives up on (nested thousands deep) with a 400 of its own
    words; the app's sentence instead. Every other HTTP error keeps FastAPI's default answer."""
    from fastapi.exception_handlers import http_exception_handler

    if error.status_code == 400 and "parsing the body" in str(error.detail):
        return await unreadable_request(request, error)
    return await http_exception_handler(request, error)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    on_space = bool(env("SPACE_ID"))
    parser = argparse.ArgumentParser(description="TransPrune demo: unpruned baseline vs pruned, side by side.")
    parser.add_argument("--model", default=env("TRANSPRUNE_MODEL", "auto"),
                        help="registry name or Hub id to preload; 'auto' = the first offline model that loads")
    parser.add_argument("--host", default=env("TRANSPRUNE_HOST", env("GRADIO_SERVER_NAME",
                                                                   "0.0.0.0" if on_space else "127.0.0.1")))
    parser.add_argument("--port", type=int, default=int(env("TRANSPRUNE_PORT", env("GRADIO_SERVER_PORT", "7860"))))
    parser.add_argument("--share", action="store_true", default=_env_flag("TRANSPRUNE_SHARE"),
                        help="create a public gradio.live link")
    parser.add_argument("--allowed-models", default=env("TRANSPRUNE_ALLOWED_MODELS", "registry" if on_space else ""),
                        help="'registry' = only registered models (Space mode); or a comma list of names; "
                             "empty = registry plus any Hub id of a supported family")
    parser.add_argument("--device", default=env("TRANSPRUNE_DEVICE"), help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=int(env("TRANSPRUNE_THREADS", "0")),
                        help="CPU threads for torch (0 = torch's default)")
    parser.add_argument("--max-upload", default=env("TRANSPRUNE_MAX_UPLOAD", inputs.MAX_UPLOAD),
                        help="largest accepted upload, e.g. 20mb")
    return parser.parse_args(argv)


def allowed_from(value: str) -> tuple[str, ...] | None:
    from transprune.models import REGISTRY

    value = (value or "").strip()
    if not value:
        return None
    if value == "registry":
        return tuple(REGISTRY)
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"--allowed-models: {', '.join(unknown)} not in the registry ({', '.join(REGISTRY)}).")
    return names


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    app = build_demo(args.model, allowed_from(args.allowed_models), args.device)
    print(f"[transprune] default model: {app.default_model} on {app.engine.device}")
    # Warm the default model in the background: the page is served at once, the first click is fast.
    threading.Thread(target=app.engine.warm, args=(app.default_model,), name="transprune-warm-up",
                     daemon=True).start()
    app.demo.launch(**launch_kwargs(args))


if __name__ == "__main__":
    main()
