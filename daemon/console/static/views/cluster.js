// Cluster: on a PostgreSQL journal, every instance, its shards, heartbeats and the fence; on
// any other, one instance. From GET /v1/cluster.

import { call } from "../api.js";
import { fill, h, messageArea, say, stacked, table } from "../dom.js";
import { ago, count, seconds } from "../format.js";

const REFRESH_MS = 3000;
const PALETTE = 8;

export function mount(root) {
  const status = messageArea("alert");
  const body = h("div", { class: "grid one-two" });
  root.append(h("div", { class: "view-head" }, h("h1", {}, "Cluster")), status, body);
  let timer = null;
  let stopped = false;

  function drawSingle(data) {
    fill(
      body,
      h(
        "section",
        { class: "card wide" },
        h("h2", {}, "Single instance"),
        h(
          "p",
          { "data-mode": "single" },
          `This segmapd runs alone on its ${data.store === "sqlite" ? "SQLite" : data.store} journal: it owns every segment, and there are no shards, leases or heartbeats to show. Several instances share a PostgreSQL journal (store.url = "postgresql://…").`,
        ),
      ),
    );
  }

  function drawCluster(data) {
    const colour = new Map(data.instances.map((instance, index) => [instance.id, `owner-${index % PALETTE}`]));
    const me = data.self;
    const fence = me.fenced
      ? h("p", { class: "badge bad" }, `Fenced: ${me.fenceReason || "rejoining"}`)
      : h("p", { class: "badge good" }, "Not fenced");
    const members = table("Instances", [["Instance"], ["Name"], ["Heartbeat", "num"], ["Shards", "num"], ["Started"]]);
    for (const instance of data.instances) {
      members.body.append(
        h(
          "tr",
          { class: instance.alive ? "" : "stale" },
          h("th", { scope: "row" }, h("span", { class: `swatch ${colour.get(instance.id)}`, "aria-hidden": "true" }), `#${instance.id}${instance.self ? " (this one)" : ""}`),
          h("td", { class: "id" }, instance.name),
          h("td", { class: instance.alive ? "num" : "num warn" }, `${seconds(instance.heartbeatAgeS)} ago${instance.alive ? "" : " (past its lease)"}`),
          h("td", { class: "num" }, count(instance.shards.length)),
          h("td", { class: "nowrap" }, ago(instance.startedAt)),
        ),
      );
    }
    const grid = h("ol", { class: "shards", "aria-label": "Shards and their owners" });
    for (const shard of data.shards) {
      const owner = shard.owner === null ? "free" : `#${shard.owner}`;
      const lease = shard.leaseLeftS === null ? "no lease" : `lease ${seconds(Math.max(0, shard.leaseLeftS))} left`;
      grid.append(
        h(
          "li",
          { class: `shard ${shard.owner === null ? "free" : colour.get(shard.owner) || "owner-unknown"}`, title: `shard ${shard.shard}: ${owner}, epoch ${shard.epoch}, ${lease}` },
          h("span", { class: "shard-number" }, String(shard.shard)),
          h("span", { class: "visually-hidden" }, `: ${owner}, epoch ${shard.epoch}, ${lease}`),
        ),
      );
    }
    fill(
      body,
      h(
        "section",
        { class: "card" },
        h("h2", {}, "This instance"),
        fence,
        h(
          "dl",
          { class: "facts" },
          h("div", { class: "fact" }, h("dt", {}, "Instance"), h("dd", {}, me.id === null ? "not joined" : `#${me.id}`)),
          h("div", { class: "fact" }, h("dt", {}, "Name"), h("dd", { class: "id" }, me.name)),
          h("div", { class: "fact" }, h("dt", {}, "Shards owned"), h("dd", {}, count(me.owned.length))),
          h("div", { class: "fact" }, h("dt", {}, "Handing over"), h("dd", {}, count(me.releasing.length))),
          h("div", { class: "fact" }, h("dt", {}, "Live instances"), h("dd", {}, count(me.liveInstances))),
          h("div", { class: "fact" }, h("dt", {}, "Lease"), h("dd", {}, seconds(data.leaseS))),
        ),
      ),
      h("section", { class: "card" }, h("h2", {}, "Instances"), stacked(members.element)),
      h("section", { class: "card wide" }, h("h2", {}, "Shards"), h("p", { class: "note" }, "Each of the 64 shards, coloured by its owner; the epoch rises at every change of owner."), grid),
    );
  }

  async function load() {
    try {
      const answer = await call("v1/cluster");
      if (stopped) return;
      say(status, "");
      if (answer.body.mode === "single") drawSingle(answer.body);
      else drawCluster(answer.body);
    } catch (error) {
      if (!stopped && error.status !== 401) say(status, `Could not read the cluster: ${error.message}`, "error");
    } finally {
      if (!stopped) timer = setTimeout(load, REFRESH_MS);
    }
  }

  load();
  return {
    unmount() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}
