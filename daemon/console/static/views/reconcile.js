// Reconcile: recent drift passes with their figures, starting one (or a dry run), and the
// progress of a running pass. Reads GET /v1/reconcile and GET /v1/reconcile/{id}; starts with
// POST /v1/reconcile (a 409 names the pass already running, which the view then follows).

import { call, segment } from "../api.js";
import { fill, h, messageArea, say, stacked, table } from "../dom.js";
import { ago, count, timestamp } from "../format.js";

const REFRESH_MS = 3000;
const PROGRESS_MS = 1500;

export function mount(root) {
  const segmentsInput = h("input", { id: "reconcile-segments", type: "text", autocomplete: "off", spellcheck: "false", placeholder: "All tracked segments" });
  const start = h("button", { type: "button" }, "Start reconcile");
  const dryRun = h("button", { type: "button", class: "secondary" }, "Start dry run");
  const controls = h(
    "div",
    { class: "card" },
    h("h2", {}, "Start a pass"),
    h("p", { class: "note" }, "A pass reads every tracked membership back from CXone and queues again, in the bulk lane, what CXone lost or gained. A dry run only counts the drift."),
    h(
      "div",
      { class: "inline-form" },
      h("div", { class: "field" }, h("label", { for: "reconcile-segments" }, "Segments (comma-separated, optional)"), segmentsInput),
      h("div", { class: "actions" }, start, dryRun),
    ),
  );
  const status = messageArea("status");
  const progress = h("div", {});
  const passes = h("div", {});
  const body = h("div", { class: "grid" }, controls, h("div", { class: "card" }, h("h2", {}, "Running pass"), progress), h("div", { class: "card wide" }, h("h2", {}, "Recent passes"), passes));
  root.append(h("div", { class: "view-head" }, h("h1", {}, "Reconcile")), status, body);

  let timer = null;
  let follow = null;
  let followTimer = null;
  let stopped = false;

  function figures(pass) {
    const done = pass.read + pass.skipped;
    return [
      ["Read", pass.total === null ? count(pass.read) : `${count(done)} of ${count(pass.total)}`],
      ["In step", count(pass.inStep)],
      ["Drifted", count(pass.drifted)],
      ["Requeued", count(pass.requeued)],
      ["Skipped", count(pass.skipped)],
    ];
  }

  function drawProgress(pass) {
    if (!pass || pass.state !== "running") {
      fill(progress, h("p", { class: "empty" }, "No pass is running."));
      start.disabled = false;
      dryRun.disabled = false;
      return;
    }
    start.disabled = true;
    dryRun.disabled = true;
    fill(
      progress,
      h("p", {}, `Pass ${pass.id}${pass.dryRun ? " (dry run)" : ""}, started ${ago(Date.parse(pass.startedAt) / 1000)}`),
      pass.total
        ? h("progress", { "aria-label": "Reconcile pass running", max: String(pass.total), value: String(pass.read + pass.skipped) })
        : h("progress", { "aria-label": "Reconcile pass running" }),
      h("dl", { class: "facts" }, figures(pass).map(([term, value]) => h("div", { class: "fact" }, h("dt", {}, term), h("dd", {}, value)))),
    );
  }

  function drawPasses(list) {
    if (!list.length) {
      fill(passes, h("p", { class: "empty" }, "No pass yet."));
      return;
    }
    const { element, body: rows } = table("Recent passes", [
      ["Started"], ["State"], ["Kind"], ["Segments"], ["Read", "num"], ["In step", "num"], ["Drifted", "num"], ["Requeued", "num"], ["Finished"],
    ]);
    for (const pass of list) {
      rows.append(
        h(
          "tr",
          {},
          h("td", { class: "nowrap" }, timestamp(pass.startedAt)),
          h("td", {}, h("span", { class: `pill pass-${pass.state}` }, pass.state)),
          h("td", {}, pass.dryRun ? "dry run" : "repair"),
          h("td", { class: "id" }, pass.segmentIds && pass.segmentIds.length ? pass.segmentIds.join(", ") : "all"),
          h("td", { class: "num" }, count(pass.read)),
          h("td", { class: "num" }, count(pass.inStep)),
          h("td", { class: "num" }, count(pass.drifted)),
          h("td", { class: "num" }, count(pass.requeued)),
          h("td", { class: "nowrap" }, pass.finishedAt ? timestamp(pass.finishedAt) : "–"),
        ),
      );
    }
    fill(passes, stacked(element));
  }

  async function followPass() {
    if (!follow || stopped) return;
    try {
      const answer = await call(`v1/reconcile/${segment(String(follow))}`);
      if (stopped) return;
      drawProgress(answer.body);
      if (answer.body.state === "running") {
        followTimer = setTimeout(followPass, PROGRESS_MS);
        return;
      }
      follow = null;
      say(status, `Pass ${answer.body.id} ${answer.body.state}: ${count(answer.body.drifted)} drifted, ${count(answer.body.requeued)} requeued.`, answer.body.state === "done" ? "good" : "error");
      load();
    } catch (error) {
      // The next listing follows it again (a pass that is still running is found there).
      follow = null;
      if (!stopped && error.status !== 401) say(status, `Could not follow the pass: ${error.message}`, "error");
    }
  }

  async function load() {
    clearTimeout(timer);
    try {
      const answer = await call("v1/reconcile");
      if (stopped) return;
      const list = (answer.body && answer.body.passes) || [];
      drawPasses(list);
      const running = list.find((pass) => pass.state === "running");
      drawProgress(running);
      if (running && follow === null) {
        follow = running.id;
        followPass();
      }
    } catch (error) {
      if (!stopped && error.status !== 401) say(status, `Could not list passes: ${error.message}`, "error");
    }
    if (!stopped) timer = setTimeout(load, REFRESH_MS);
  }

  async function begin(dry) {
    const ids = segmentsInput.value.split(",").map((s) => s.trim()).filter(Boolean);
    const body = {};
    if (ids.length) body.segmentIds = ids;
    if (dry) body.dryRun = true;
    try {
      const answer = await call("v1/reconcile", { method: "POST", body, accept: [409] });
      if (answer.status === 409) {
        const running = answer.body && answer.body.running;
        say(status, `Pass ${running ? running.id : ""} is running already: its progress is shown.`, "error");
        if (running && follow === null) {
          follow = running.id;
          followPass();
        }
      } else {
        say(status, `Pass ${answer.body.id} started${dry ? " (dry run)" : ""}.`, "good");
        follow = answer.body.id;
        drawProgress(answer.body);
        followPass();
      }
    } catch (error) {
      if (error.status !== 401) say(status, `Could not start a pass: ${error.message}`, "error");
    }
    load();
  }

  start.addEventListener("click", () => begin(false));
  dryRun.addEventListener("click", () => begin(true));
  load();
  return {
    unmount() {
      stopped = true;
      clearTimeout(timer);
      clearTimeout(followTimer);
    },
  };
}
