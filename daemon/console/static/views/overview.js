// Overview: readiness, the journal's assignments by state, throughput against the limits, the
// rate gates, the validation backlog, the refresh budget, and charts of the last ten minutes.
// Everything comes from /readyz and /v1/overview (figures the daemon keeps in memory).

import { call } from "../api.js";
import { lineChart } from "../chart.js";
import { fill, h, messageArea, say, table, tile } from "../dom.js";
import { ago, clock, count, rate, seconds, words } from "../format.js";

const REFRESH_MS = 3000;
const STATES = ["queued", "sending", "retrying", "written", "verifying", "active", "removed", "failed"];

export function mount(root) {
  const updated = h("p", { class: "updated", "data-updated": "" }, "Loading…");
  const problem = messageArea("alert");
  const readiness = h("div", { class: "card" });
  const census = h("div", { class: "card" });
  const throughput = h("div", { class: "card wide" });
  const charts = h("div", { class: "card wide" });
  const work = h("div", { class: "card" });
  const gates = h("div", { class: "card" });
  const validation = h("div", { class: "card" });
  const refresh = h("div", { class: "card" });
  root.append(
    h("div", { class: "view-head" }, h("h1", {}, "Overview"), updated),
    problem,
    h("div", { class: "grid three" }, readiness, census, work, throughput, charts, gates, validation, refresh),
  );

  let samples = [];
  let interval = 2;
  let timer = null;
  let stopped = false;

  function drawReadiness(ready) {
    const { element, body } = table("Readiness checks", [["Check"], ["Result"]]);
    for (const [name, value] of Object.entries(ready.checks || {})) {
      const fine = value === "ok" || (name === "draining" && value === "no");
      body.append(
        h("tr", {}, h("th", { scope: "row" }, words(name)), h("td", { class: fine ? "good" : "warn" }, value)),
      );
    }
    fill(
      readiness,
      h("h2", {}, "Readiness"),
      h("p", { class: `badge ${ready.ready ? "good" : "bad"}`, "data-ready": String(ready.ready) }, ready.ready ? "Ready" : "Not ready"),
      element,
    );
  }

  function drawCensus(data) {
    const states = data.census.states;
    const { element, body } = table("Assignments by state", [["State"], ["Assignments", "num"]]);
    for (const state of STATES) {
      body.append(
        h(
          "tr",
          { "data-state": state },
          h("th", { scope: "row" }, h("span", { class: `dot state-${state}`, "aria-hidden": "true" }), state),
          h("td", { class: "num" }, states ? count(states[state]) : "–"),
        ),
      );
    }
    fill(
      census,
      h("h2", {}, "Assignments by state"),
      h("p", { class: "note" }, data.census.countedAt ? `Journal-wide, counted ${ago(data.census.countedAt)}` : "Not counted yet"),
      element,
    );
  }

  function drawThroughput(data) {
    const r = data.rates;
    fill(
      throughput,
      h("h2", {}, "Throughput"),
      h(
        "div",
        { class: "tiles" },
        tile("Webhooks/s", rate(r.webhooksPerS), `mean of the last ${r.windowS} s`),
        tile("Bulk writes/s", `${rate(r.writesPerS)} / ${rate(r.writeLimitPerS)}`, "against write_rps"),
        tile("Reads/s", `${rate(r.readsPerS)} / ${rate(r.readLimitPerS)}`, "against read_rps"),
        tile("429s", count(r.rateLimitedLastMinute), "in the last minute"),
        tile("Single writes/s", rate(r.singleWritesPerS), "last-resort fallbacks"),
      ),
    );
  }

  function drawCharts() {
    const span = Math.max(2, Math.round(600 / interval));
    const kept = samples.slice(-span);
    const series = (key) => kept.map((s) => s[key]);
    const limits = latest ? latest.rates : {};
    fill(
      charts,
      h("h2", {}, "Last 10 minutes"),
      h(
        "div",
        { class: "charts" },
        lineChart({ title: "Webhooks/s", span, minutes: 10, series: [{ label: "received", cls: "s1", values: series("webhooksPerS") }] }),
        lineChart({ title: "Bulk writes/s", span, minutes: 10, limit: limits.writeLimitPerS, series: [{ label: "sent", cls: "s2", values: series("writesPerS") }] }),
        lineChart({ title: "Reads/s", span, minutes: 10, limit: limits.readLimitPerS, series: [{ label: "sent", cls: "s3", values: series("readsPerS") }] }),
        lineChart({
          title: "Work in progress",
          span,
          minutes: 10,
          unit: "",
          series: [
            { label: "pending writes", cls: "s4", values: series("pendingWrites") },
            { label: "verifying", cls: "s3", values: series("verifying") },
          ],
        }),
      ),
    );
  }

  function drawWork(data) {
    const w = data.work;
    fill(
      work,
      h("h2", {}, "Work in progress"),
      h(
        "dl",
        { class: "facts" },
        fact("Pending writes", count(w.pendingWrites)),
        fact("High-water mark", count(w.highWater)),
        fact("Buffered, live", count(w.buffered.live)),
        fact("Buffered, bulk", count(w.buffered.bulk)),
        fact("Waiting for a contact slot", count(w.parked)),
        fact("Being confirmed", count(w.verifying)),
        w.overloaded ? fact("Intake", "refused: above the high-water mark") : null,
      ),
    );
  }

  function drawGates(data) {
    const { element, body } = table("Rate gates", [["Class"], ["Limit/s", "num"], ["Paused", "num"], ["Waited", "num"]]);
    for (const [name, gate] of Object.entries(data.gates)) {
      body.append(
        h(
          "tr",
          {},
          h("th", { scope: "row" }, name),
          h("td", { class: "num" }, rate(gate.limitPerS)),
          h("td", { class: gate.pausedForS > 0 ? "num warn" : "num" }, gate.pausedForS > 0 ? seconds(gate.pausedForS) : "no"),
          h("td", { class: "num" }, seconds(gate.waitedS)),
        ),
      );
    }
    fill(gates, h("h2", {}, "Rate gates"), h("p", { class: "note" }, "A 429 pauses its whole class for its Retry-After."), element);
  }

  function drawValidation(data) {
    const v = data.validation;
    fill(
      validation,
      h("h2", {}, "Validation backlog"),
      h(
        "dl",
        { class: "facts" },
        fact("Reads waiting", count(v.readsWaiting)),
        fact("Oldest due for", seconds(v.oldestWaitS)),
        fact("Reads in flight", count(v.reading)),
        fact("Waiting for a refresh", count(v.awaitingRefresh)),
      ),
    );
  }

  function drawRefresh(data) {
    const r = data.refresh;
    fill(
      refresh,
      h("h2", {}, "Refresh budget"),
      h(
        "dl",
        { class: "facts" },
        fact("One per segment every", seconds(r.minIntervalS)),
        fact("Refreshes in the last hour", count(r.refreshesLastHour)),
        fact("Segments refreshing", count(r.segmentsRefreshing)),
        fact("Segments waiting for budget", count(r.segmentsWaitingForBudget)),
      ),
    );
  }

  let latest = null;

  async function tick() {
    try {
      const since = samples.length ? samples[samples.length - 1].at : null;
      const [ready, data] = await Promise.all([
        call("readyz", { auth: false, accept: [503] }),
        call(since === null ? "v1/overview" : `v1/overview?since=${since}`),
      ]);
      if (stopped) return;
      latest = data.body;
      interval = latest.sampleIntervalS;
      const last = samples.length ? samples[samples.length - 1].at : -Infinity;
      samples = samples.concat(latest.samples.filter((sample) => sample.at > last)).slice(-Math.round(600 / interval));
      drawReadiness(ready.body);
      drawCensus(latest);
      drawThroughput(latest);
      drawCharts();
      drawWork(latest);
      drawGates(latest);
      drawValidation(latest);
      drawRefresh(latest);
      say(problem, "");
      updated.textContent = `Updated ${clock(latest.at)}`;
      updated.dataset.updated = String(latest.at);
    } catch (error) {
      if (!stopped && error.status !== 401) say(problem, `Could not refresh: ${error.message}`, "error");
    } finally {
      if (!stopped) timer = setTimeout(tick, REFRESH_MS);
    }
  }

  tick();
  return {
    unmount() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

function fact(term, value) {
  return h("div", { class: "fact" }, h("dt", {}, term), h("dd", {}, value));
}
