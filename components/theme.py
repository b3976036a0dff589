"""Theme and CSS: large, high-contrast type that reads from the back of a lecture hall.

System fonts only, so the page needs no font download (offline machines, air-gapped talks).
"""

from __future__ import annotations

import gradio as gr

SYSTEM_SANS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial",
               "sans-serif"]
SYSTEM_MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="cyan", neutral_hue="slate",
                          font=SYSTEM_SANS, font_mono=SYSTEM_MONO, text_size="lg", radius_size="md").set(
        button_primary_background_fill="*primary_600", button_primary_background_fill_hover="*primary_700",
        button_primary_text_color="white", button_primary_border_color="*primary_600")


CSS = """
.gradio-container { max-width: 1500px !important; margin: 0 auto !important; }
#header h1 { font-size: 2.1rem; margin-bottom: 0.2rem; letter-spacing: -0.01em; }
#header p { font-size: 1.05rem; color: var(--body-text-color-subdued); }
#what-you-see { font-size: 0.95rem; }
/* The verdict reads from the back of a hall: 24 px, its held-out line no smaller than body text. */
.verdict { font-size: 1.5rem; line-height: 1.4; padding: 0.6rem 0.9rem; border-radius: 10px;
           background: var(--block-background-fill); border: 1px solid var(--border-color-primary); }
.verdict p { margin: 0; }
/* Gradio's markdown sets its own 16 px on .md: the verdict's size has to be set there. */
#verdict .md { font-size: 1.5rem !important; line-height: 1.4; }
#verdict .md small { display: block; font-size: 1rem; line-height: 1.45; margin-top: 0.25rem; }
#verdict .md p > small:first-child { display: inline; }   /* the question line: already followed by a break */
/* The measure button looks like one: filled, bordered, bold. */
#speed-run { background: var(--primary-50) !important; border: 2px solid var(--primary-600) !important;
             color: var(--primary-700) !important; font-weight: 600; }
/* The frontier's 10-column table scrolls inside its box rather than widening the page (a phone). */
#frontier-table, #frontier-figure { max-width: 100%; min-width: 0; overflow-x: auto; }
/* The figure at the box's width and its own aspect: Gradio's image frame would otherwise crop it to its height. */
#frontier-figure, #frontier-figure * { height: auto !important; max-height: none !important; }
#frontier-figure img { width: 100%; max-width: 100%; object-fit: contain; }
/* On a phone the figure keeps a readable size and scrolls sideways inside its box (or opens full screen). */
@media (max-width: 700px) {
  /* 100vw, not 100%: the accordion's boxes would otherwise grow to the picture's width and widen the page. */
  #frontier-figure { min-width: 0 !important; max-width: calc(100vw - 36px) !important;
                    overflow-x: auto !important; }
  #frontier-figure img { min-width: 680px; max-width: none; }
  /* Overflow to the right, where it scrolls (centred, its left part would be out of reach). */
  #frontier-figure button, #frontier-figure .image-frame { justify-content: flex-start !important; }
}
/* width 0 + min-width 100%: the table fills its box but adds nothing to the page's minimum width. */
#frontier-table table { display: block; width: 0; min-width: 100%; overflow-x: auto; white-space: nowrap;
                        font-size: 0.8rem; }
#frontier-table code { white-space: normal; overflow-wrap: anywhere; }
#health-warning { padding: 0.45rem 0.8rem; border-radius: 8px; background: #fef3c7; color: #78350f;
                   border: 1px solid #f59e0b !important; }
#health-warning p { margin: 0; }
.run-status { font-size: 0.9rem; color: var(--body-text-color-subdued); }
.answer .textfield, .answer .textspan { font-size: 1.45rem !important; line-height: 1.5 !important; }
.answer { min-height: 150px; }
#answer-baseline { border-left: 6px solid #64748b; }
#answer-pruned { border-left: 6px solid #4f46e5; }
.model-info { font-size: 0.9rem; }
#run { font-size: 1.2rem; min-height: 3.2rem; }
#patch-table td, #patch-table th { font-size: 0.85rem; padding: 4px 6px; }
/* Never wider than the screen (a 390 px phone included): wide tables scroll inside their own panel. */
#metrics-table, #patch-table { max-width: calc(100vw - 36px) !important; }
/* Answers wrap between words, never inside one. */
.answer .textspan, .answer .textfield { word-break: normal !important; overflow-wrap: break-word !important;
                                        hyphens: none; }
#overlay-legend { font-size: 0.95rem; }
/* Galleries: three tiles a row whatever their number (one on a phone), the whole gallery shown. */
#stage-gallery .grid-container, #heatmap-gallery .grid-container {
    grid-template-columns: repeat(3, minmax(0, 1fr)) !important; }
#stage-gallery .grid-wrap, #heatmap-gallery .grid-wrap { height: auto !important; max-height: none !important; }
/* Gallery captions wrap instead of ending in an ellipsis. */
#stage-gallery .caption-label, #heatmap-gallery .caption-label { white-space: normal !important;
    text-overflow: clip !important; overflow: visible !important; max-width: 95% !important; }
#speed-result h3 { margin-top: 0.2rem; }
/* The question's live count: a small line tucked under the box. */
#question-count { font-size: 0.85rem; color: var(--body-text-color-subdued); margin-top: -0.6rem; }
#question-count p { margin: 0; }
@media (max-width: 640px) {
  #header h1 { font-size: 1.4rem; }
  #header p { font-size: 0.85rem; }
  .answer { min-height: 84px; }
  /* An answer not given yet is a short empty box, not a 236 px placeholder filling the first screen. */
  .answer .empty { min-height: 48px !important; height: 48px !important; }
  .answer .empty .icon { display: none; }
  /* A phone's first screen: the verdict and both answers, then the image, the question and Run; the
     overlay and the speed panel after them. The hero column's pieces join the inputs' flex column
     (display: contents) so that `order` can interleave them. */
  #hero-row { flex-direction: column !important; }
  #hero { display: contents !important; }
  #hero > * { order: 3; }
  #hero > #verdict, #hero > #answers-row { order: 1; }
  #inputs { order: 2; }
  #input-image { height: 180px !important; }
  #input-image .image-frame img { max-height: 140px; }
  #stage-gallery .grid-container, #heatmap-gallery .grid-container {
      grid-template-columns: minmax(0, 1fr) !important; }
  #model input { font-size: 0.85rem !important; }
  #metrics-table th, #metrics-table td, #patch-table th, #patch-table td { font-size: 0.78rem !important;
      padding: 4px !important; }
  #metrics-table th .header, #patch-table th .header { word-break: keep-all !important;
      overflow-wrap: normal !important; }
  /* Numbers ("0.000347", "2.17×") never split across lines: a wide cell scrolls in the table's panel. */
  #metrics-table .body-cell span.text, #patch-table .body-cell span.text { word-break: normal !important;
      overflow-wrap: normal !important; font-size: 0.74rem !important; }
  #metrics-table .body-cell .cell-wrap, #patch-table .body-cell .cell-wrap { padding-left: 3px !important;
      padding-right: 3px !important; }
  #metrics-table th .cell-wrap, #patch-table th .cell-wrap { padding-left: 2px !important;
      padding-right: 2px !important; }
  #verdict .md { font-size: 1.15rem !important; }
  #verdict .md small { font-size: 0.9rem; }
  .answer .textfield, .answer .textspan { font-size: 1.25rem !important; }
}
"""

# Rules for the page around the app (outside `.contain`, where launch(css=...) does not reach): on a
# phone the default 32 px side padding leaves too little room for the panels.
HEAD = """<style>
@media (max-width: 640px) { .fillable.app { padding-left: 6px !important; padding-right: 6px !important; } }
</style>"""
