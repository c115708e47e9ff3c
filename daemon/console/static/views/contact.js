// Contact: one contact's segments (intent, state, reason, attempts, lane, validation) and each
// pair's history of transitions, from GET /v1/contacts/{id}. Ids are shown as text only.

import { call, segment } from "../api.js";
import { fill, h, messageArea, say, stacked, table } from "../dom.js";
import { count, precise, timestamp, words } from "../format.js";

const REFRESH_MS = 3000;

export function mount(root, { argument }) {
  const input = h("input", { id: "contact-id", name: "contactId", type: "text", autocomplete: "off", spellcheck: "false", required: true });
  const form = h(
    "form",
    { class: "inline-form", role: "search" },
    h("div", { class: "field" }, h("label", { for: "contact-id" }, "Contact id"), input),
    h("button", { type: "submit" }, "Look up"),
  );
  const status = messageArea("status");
  const results = h("div", { class: "results" });
  root.append(h("div", { class: "view-head" }, h("h1", {}, "Contact")), h("div", { class: "card" }, form, status), results);

  let current = "";
  let timer = null;
  let stopped = false;

  function draw(data) {
    const { element, body } = table(`Segments of contact ${data.contactId}`, [
      ["Segment"], ["Intent"], ["State"], ["Reason"], ["Attempts", "num"], ["Lane"], ["Validation"], ["Updated"],
    ]);
    const histories = [];
    for (const s of data.segments) {
      const validation = s.validation
        ? `${count(s.validation.reads)} reads so far${s.validation.awaitingRefresh ? ", waiting for a refresh" : ""}${s.validation.nextReadAt ? `, next ${timestamp(s.validation.nextReadAt)}` : ""}`
        : "–";
      body.append(
        h(
          "tr",
          { "data-segment": s.segmentId },
          h("th", { scope: "row", class: "id" }, s.segmentId),
          h("td", {}, s.intent),
          h("td", {}, h("span", { class: `pill state-${s.state}` }, s.state)),
          h("td", {}, s.reason ? words(s.reason) : "–"),
          h("td", { class: "num" }, count(s.attempts)),
          h("td", {}, s.lane),
          h("td", {}, validation),
          h("td", { class: "nowrap" }, timestamp(s.updatedAt)),
        ),
      );
      if (s.message) {
        body.append(h("tr", { class: "detail" }, h("td", { colspan: 8 }, h("span", { class: "note" }, "Message: "), h("span", { class: "message-text" }, s.message))));
      }
      const steps = h("ol", { class: "history" });
      for (const step of s.history || []) {
        steps.append(h("li", {}, h("span", { class: `pill state-${step.state}` }, step.state), " ", h("time", { datetime: step.at }, precise(step.at))));
      }
      histories.push(
        h(
          "details",
          { class: "history-item" },
          h("summary", {}, h("span", { class: "id" }, s.segmentId), ` · ${s.intent} · ${(s.history || []).length} transitions`),
          (s.history || []).length ? steps : h("p", { class: "note" }, "No transitions journaled yet."),
        ),
      );
    }
    const backlog = data.validation
      ? h("p", { class: "note" }, `${count(data.validation.readsWaiting)} reads wait ahead of this contact's pairs; about ${count(data.validation.estimatedDrainS)} s at the read limit.`)
      : null;
    fill(
      results,
      h(
        "section",
        { class: "card", "aria-labelledby": "contact-title" },
        h("h2", { id: "contact-title" }, "Contact ", h("span", { class: "id", "data-contact-id": "" }, data.contactId)),
        stacked(element),
        backlog,
      ),
      h("section", { class: "card" }, h("h2", {}, "History"), histories),
    );
  }

  async function load(quiet) {
    if (!current) return;
    const asked = current;
    try {
      const answer = await call(`v1/contacts/${segment(asked)}`, { accept: [404] });
      // Another contact was looked up meanwhile: this answer is not the one on screen.
      if (stopped || asked !== current) return;
      if (answer.status === 404) {
        results.replaceChildren();
        say(status, `segmapd holds nothing for contact ${asked}.`, "info");
      } else {
        say(status, "");
        draw(answer.body);
      }
    } catch (error) {
      if (!stopped && error.status !== 401 && !quiet) say(status, `Could not look it up: ${error.message}`, "error");
    }
    clearTimeout(timer);
    if (!stopped) timer = setTimeout(() => load(true), REFRESH_MS);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    current = input.value;
    if (!current) {
      say(status, "Enter a contact id.", "error");
      return;
    }
    history.replaceState(null, "", `#contact/${encodeURIComponent(current)}`);
    results.replaceChildren();
    load(false);
  });

  if (argument) {
    input.value = argument;
    current = argument;
    load(false);
  } else {
    input.focus();
  }
  return {
    unmount() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}
