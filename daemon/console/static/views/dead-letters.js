// Dead letters: filtered (reason, segment, source) and paged by the daemon (a cursor per page, a
// count of the matching set), replayed by selection ("Replay") or by exactly the filtered set
// ("Replay all matching", confirmed first, bounded by the newest dead letter counted).

import { call } from "../api.js";
import { fill, h, messageArea, say, stacked, table } from "../dom.js";
import { count, timestamp, words } from "../format.js";

const PAGE = 50;
const REASONS = ["contact_not_found", "invalid_contact_id", "segment_not_found", "retries_exhausted", "not_indexed"];
// The source the daemon journals for the admin API's changes (POST /v1/mappings, imports).
const MAPPINGS = "mappings";

function sourceLabel(name) {
  return name === MAPPINGS ? `${MAPPINGS} (admin API)` : name;
}

export function mount(root, { argument }) {
  const reason = h(
    "select",
    { id: "dl-reason", name: "reason" },
    h("option", { value: "" }, "Any reason"),
    REASONS.map((r) => h("option", { value: r }, words(r))),
  );
  const segmentInput = h("input", { id: "dl-segment", name: "segment", type: "text", autocomplete: "off", spellcheck: "false", placeholder: "Any segment" });
  // Its options are the sources the daemon names (the overview's `sources`), once it answers.
  const source = h("select", { id: "dl-source", name: "source" }, h("option", { value: "" }, "Any source"));
  const filters = h(
    "form",
    { class: "inline-form", "aria-label": "Filter dead letters" },
    h("div", { class: "field" }, h("label", { for: "dl-reason" }, "Reason"), reason),
    h("div", { class: "field" }, h("label", { for: "dl-segment" }, "Segment"), segmentInput),
    h("div", { class: "field" }, h("label", { for: "dl-source" }, "Source"), source),
    h("button", { type: "submit" }, "Filter"),
  );
  const summary = h("p", { class: "summary", "data-matching": "" }, "");
  const status = messageArea("status");
  // "Replay" and "Replay all matching" are the buttons' names, whatever is selected: the count
  // of the selection is said beside them.
  const replaySelected = h("button", { type: "button", disabled: true }, "Replay");
  const selection = h("span", { class: "note selection", "aria-live": "polite" }, "");
  const replayAll = h("button", { type: "button", class: "secondary", disabled: true }, "Replay all matching");
  const previous = h("button", { type: "button", class: "quiet", disabled: true }, "Previous page");
  const next = h("button", { type: "button", class: "quiet", disabled: true }, "Next page");
  const pageLabel = h("span", { class: "note" }, "");
  const listing = h("div", {});
  const confirmText = h("p", {});
  const confirmButton = h("button", { type: "button", class: "danger" }, "Confirm");
  const cancelButton = h("button", { type: "button", class: "quiet" }, "Cancel");
  const dialog = h(
    "dialog",
    { "aria-labelledby": "dl-confirm-title" },
    h("h2", { id: "dl-confirm-title" }, "Replay all matching dead letters?"),
    confirmText,
    h("div", { class: "actions" }, cancelButton, confirmButton),
  );
  root.append(
    h("div", { class: "view-head" }, h("h1", {}, "Dead letters")),
    h("div", { class: "card" }, filters),
    h(
      "div",
      { class: "card wide" },
      h("div", { class: "toolbar" }, summary, h("div", { class: "actions" }, selection, replaySelected, replayAll)),
      status,
      listing,
      h("div", { class: "pager" }, previous, pageLabel, next),
    ),
    dialog,
  );

  let applied = { reason: "", segment: "", source: "" };
  let cursors = [null]; // the `after` of each page seen so far
  let pageIndex = 0;
  let page = { deadLetters: [], next: null };
  // What the last answer for the filter on screen counted, with that filter: "Replay all
  // matching" replays exactly this (its filter, up to its newest), never a newer filter's set.
  let counted = { filter: applied, matching: 0, newest: null };
  let loads = 0; // numbers each listing request: an answer to an older one is dropped
  let selected = new Map(); // "contact\u0000segment" -> {contactId, segmentId}
  let stopped = false;

  function query(after, withCount) {
    const params = new URLSearchParams({ limit: String(PAGE) });
    if (applied.reason) params.set("reason", applied.reason);
    if (applied.segment) params.set("segment", applied.segment);
    if (applied.source) params.set("source", applied.source);
    if (after) params.set("after", after);
    if (withCount) params.set("count", "true");
    return `v1/dead-letters?${params}`;
  }

  function describeFilter(filter) {
    const parts = [];
    if (filter.reason) parts.push(`reason ${words(filter.reason)}`);
    if (filter.segment) parts.push(`segment ${filter.segment}`);
    if (filter.source) parts.push(`source ${sourceLabel(filter.source)}`);
    return parts.length ? parts.join(" and ") : "no filter";
  }

  function keyOf(row) {
    return `${row.contactId}\u0000${row.segmentId}`;
  }

  function syncButtons() {
    replaySelected.disabled = selected.size === 0;
    selection.textContent = selected.size ? `${count(selected.size)} selected` : "";
    replayAll.disabled = counted.matching === 0 || !counted.newest || counted.filter !== applied;
    previous.disabled = pageIndex === 0;
    next.disabled = !page.next;
    const matching = counted.matching;
    pageLabel.textContent = matching ? `Page ${pageIndex + 1} of ${count(Math.max(1, Math.ceil(matching / PAGE)))}` : "";
  }

  function draw() {
    const matching = counted.matching;
    summary.textContent = `${count(matching)} dead letter${matching === 1 ? "" : "s"} match (${describeFilter(counted.filter)})`;
    summary.dataset.matching = String(matching);
    if (!page.deadLetters.length) {
      fill(listing, h("p", { class: "empty" }, matching ? "No dead letters on this page." : "No dead letters match."));
      syncButtons();
      return;
    }
    const all = h("input", { type: "checkbox", "aria-label": "Select every dead letter on this page" });
    const { element, body } = table("Dead letters", [
      [all], ["Contact id"], ["Segment"], ["Source"], ["Intent"], ["Reason"], ["Attempts", "num"], ["Failed"], ["Message"],
    ]);
    const boxes = [];
    for (const row of page.deadLetters) {
      const box = h("input", {
        type: "checkbox",
        checked: selected.has(keyOf(row)),
        "aria-label": `Select ${row.contactId} in ${row.segmentId}`,
        onchange: () => {
          if (box.checked) selected.set(keyOf(row), { contactId: row.contactId, segmentId: row.segmentId });
          else selected.delete(keyOf(row));
          all.checked = boxes.every((b) => b.checked);
          syncButtons();
        },
      });
      boxes.push(box);
      body.append(
        h(
          "tr",
          { "data-contact": row.contactId, "data-segment": row.segmentId },
          h("td", { "data-label": "Select" }, box),
          h("td", { class: "id" }, h("a", { href: `#contact/${encodeURIComponent(row.contactId)}` }, row.contactId)),
          h("td", { class: "id" }, row.segmentId),
          // Null: journaled before segmapd recorded sources.
          h("td", { class: "id", "data-source": row.source || "" }, row.source ? sourceLabel(row.source) : "–"),
          h("td", {}, row.intent),
          h("td", { class: "nowrap" }, words(row.reason || "")),
          h("td", { class: "num" }, count(row.attempts)),
          h("td", { class: "nowrap" }, timestamp(row.updatedAt)),
          h("td", { class: "message-text" }, row.message || "–"),
        ),
      );
    }
    all.checked = boxes.length > 0 && boxes.every((b) => b.checked);
    all.addEventListener("change", () => {
      for (const [index, row] of page.deadLetters.entries()) {
        boxes[index].checked = all.checked;
        if (all.checked) selected.set(keyOf(row), { contactId: row.contactId, segmentId: row.segmentId });
        else selected.delete(keyOf(row));
      }
      syncButtons();
    });
    fill(listing, stacked(element));
    syncButtons();
  }

  async function load() {
    const ticket = ++loads;
    const asked = applied;
    try {
      const answer = await call(query(cursors[pageIndex], true));
      if (stopped || ticket !== loads) return; // a newer listing was asked for meanwhile
      page = answer.body;
      counted = { filter: asked, matching: answer.body.matching, newest: answer.body.newest };
      draw();
    } catch (error) {
      if (stopped || ticket !== loads) return;
      // Nothing counted for this filter: nothing to replay by it until a listing succeeds.
      counted = { filter: asked, matching: 0, newest: null };
      syncButtons();
      if (error.status !== 401) say(status, `Could not list dead letters: ${error.message}`, "error");
    }
  }

  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    applied = { reason: reason.value, segment: segmentInput.value.trim(), source: source.value };
    counted = { filter: applied, matching: 0, newest: null };
    syncButtons();
    cursors = [null];
    pageIndex = 0;
    selected = new Map();
    say(status, "");
    load();
  });

  next.addEventListener("click", () => {
    if (!page.next) return;
    cursors[pageIndex + 1] = page.next;
    pageIndex += 1;
    load();
  });

  previous.addEventListener("click", () => {
    if (pageIndex === 0) return;
    pageIndex -= 1;
    load();
  });

  async function replay(body, what) {
    replaySelected.disabled = true;
    replayAll.disabled = true;
    try {
      const answer = await call("v1/dead-letters/replay", { method: "POST", body });
      const { replayed, skipped } = answer.body;
      say(
        status,
        `Replayed ${count(replayed)} ${what}${skipped ? ` (${count(skipped)} skipped: invalid when they arrived)` : ""}.`,
        "good",
      );
    } catch (error) {
      if (error.status !== 401) say(status, `Replay failed: ${error.message}`, "error");
    }
    selected = new Map();
    cursors = [null];
    pageIndex = 0;
    await load();
  }

  replaySelected.addEventListener("click", () => {
    const chosen = [...selected.values()];
    if (chosen.length) replay({ deadLetters: chosen }, chosen.length === 1 ? "dead letter" : "dead letters");
  });

  replayAll.addEventListener("click", () => {
    const { matching, filter } = counted;
    confirmText.textContent = `This queues all ${count(matching)} dead letter${matching === 1 ? "" : "s"} matching ${describeFilter(filter)} again, each as what it was (an add or a removal). Dead letters that fail from now on are not included.`;
    dialog.showModal();
  });

  cancelButton.addEventListener("click", () => dialog.close());

  confirmButton.addEventListener("click", () => {
    dialog.close();
    // Exactly the set counted: the filter it was counted with, and nothing newer than its newest.
    const { filter, newest } = counted;
    if (!newest || filter !== applied) return;
    const body = { through: newest };
    if (filter.reason) body.reason = filter.reason;
    if (filter.segment) body.segment = filter.segment;
    if (filter.source) body.source = filter.source;
    replay(body, "matching dead letters");
  });

  async function loadSources() {
    try {
      // Samples from now on only: none, since only the source names are wanted here.
      const answer = await call(`v1/overview?since=${Math.floor(Date.now() / 1000)}`);
      if (stopped) return;
      source.append(...answer.body.sources.map((name) => h("option", { value: name }, sourceLabel(name))));
    } catch (error) {
      if (!stopped && error.status !== 401) say(status, `Could not list the sources: ${error.message}`, "error");
    }
  }

  // "#dead-letters/VIP" (from the Segments view) opens on that segment's dead letters.
  if (argument) {
    segmentInput.value = argument;
    applied = { reason: "", segment: argument, source: "" };
    counted = { filter: applied, matching: 0, newest: null };
  }
  loadSources();
  load();
  return {
    unmount() {
      stopped = true;
      if (dialog.open) dialog.close();
    },
  };
}
