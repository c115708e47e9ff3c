// Segments: per segment, what is queued, in flight, being confirmed and dead, its last write and
// what became of it, and its refresh budget. From GET /v1/segments (memory, never the journal).

import { call } from "../api.js";
import { fill, h, messageArea, say, stacked, table } from "../dom.js";
import { ago, count, seconds, until } from "../format.js";

const REFRESH_MS = 4000;

function outcome(last) {
  if (!last) return "–";
  const parts = Object.entries(last.outcomes)
    .filter(([, n]) => n)
    .map(([name, n]) => `${count(n)} ${name}`);
  const sent = `${count(last.ids)} ${last.ids === 1 ? "id" : "ids"}${last.attempt > 1 ? ` (attempt ${last.attempt})` : ""}, ${ago(last.at)}`;
  return parts.length ? `${sent}: ${parts.join(", ")}` : `${sent}: awaiting the answer`;
}

function refreshText(refresh) {
  if (refresh.refreshing) return refresh.waitingForBudget ? "waiting for its budget" : "refreshing";
  if (refresh.nextAllowedAt) return `next allowed ${until(refresh.nextAllowedAt)}`;
  return refresh.lastAt ? `refreshed ${ago(refresh.lastAt)}, available` : "available";
}

export function mount(root) {
  const find = h("input", { id: "segment-find", type: "search", autocomplete: "off", spellcheck: "false", placeholder: "Segment id" });
  const summary = h("p", { class: "summary" }, "Loading…");
  const status = messageArea("alert");
  const listing = h("div", {});
  root.append(
    h("div", { class: "view-head" }, h("h1", {}, "Segments")),
    h(
      "div",
      { class: "card wide" },
      h("div", { class: "toolbar" }, summary, h("div", { class: "field compact" }, h("label", { for: "segment-find" }, "Find a segment"), find)),
      status,
      listing,
    ),
  );
  let data = null;
  let timer = null;
  let stopped = false;

  function draw() {
    if (!data) return;
    // The daemon found them among every segment (`find`), not only the busiest ones.
    const rows = data.segments;
    const of = data.matching < data.total ? `${count(data.matching)} matching of ${count(data.total)}` : count(data.total);
    const shown = data.matching > rows.length ? `the busiest ${count(rows.length)} of ${of}` : of;
    summary.textContent = `${shown} segments · ${count(data.parked)} ids wait for a contact slot · refresh at most every ${seconds(data.refreshMinIntervalS)} per segment${data.shared ? " · work counts are this instance's segments" : ""}`;
    if (!rows.length) {
      fill(listing, h("p", { class: "empty" }, data.total ? "No segment matches." : "No segment has work or dead letters yet."));
      return;
    }
    const { element, body } = table("Segments", [
      ["Segment"], ["Queued", "num"], ["In flight", "num"], ["Verifying", "num"], ["Failed", "num"], ["Last write"], ["Refresh"],
    ]);
    for (const s of rows) {
      body.append(
        h(
          "tr",
          { "data-segment": s.segmentId },
          h("th", { scope: "row", class: "id" }, s.segmentId),
          h("td", { class: "num" }, count(s.queued)),
          h("td", { class: "num" }, count(s.inFlight)),
          h("td", { class: "num" }, count(s.verifying)),
          h("td", { class: s.failed ? "num warn" : "num" }, s.failed ? h("a", { href: `#dead-letters/${encodeURIComponent(s.segmentId)}`, "aria-label": `${count(s.failed)} dead letters of ${s.segmentId}` }, count(s.failed)) : "0"),
          h("td", {}, outcome(s.lastWrite)),
          h("td", {}, refreshText(s.refresh)),
        ),
      );
    }
    fill(listing, stacked(element));
  }

  let loads = 0; // numbers each request: only the newest draws, and schedules the next
  async function load() {
    const ticket = ++loads;
    try {
      const wanted = find.value.trim();
      const answer = await call(wanted ? `v1/segments?find=${encodeURIComponent(wanted)}` : "v1/segments");
      if (stopped || ticket !== loads) return;
      data = answer.body;
      say(status, "");
      draw();
    } catch (error) {
      if (!stopped && ticket === loads && error.status !== 401) say(status, `Could not refresh: ${error.message}`, "error");
    } finally {
      if (!stopped && ticket === loads) {
        clearTimeout(timer);
        timer = setTimeout(load, REFRESH_MS);
      }
    }
  }

  let typing = null;
  find.addEventListener("input", () => {
    // Asked once typing pauses: the daemon searches every segment.
    clearTimeout(typing);
    typing = setTimeout(() => {
      clearTimeout(timer);
      load();
    }, 250);
  });
  load();
  return {
    unmount() {
      stopped = true;
      clearTimeout(timer);
      clearTimeout(typing);
    },
  };
}
