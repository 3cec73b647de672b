"""The web service's one page (HTML, CSS and JavaScript in a string, nothing loaded from outside).

It talks to the endpoints of :func:`.service.create_app`: ``/health`` fills the k, ranker and attribute choices,
``/query`` takes a dropped or picked file (refused on the page when over ``max_upload_bytes``), ``/images/{id}``
serves the matches' thumbnails, ``/label-issues`` the "label issues" view, and ``/map`` the "map" view: an inline SVG
scatter of the references (colour by label, red ring for a label-issue suspect, grey line per near-duplicate pair)
where hovering a point shows its thumbnail and key and clicking it queries with that reference's own file. The
service replaces ``{{title}}``.
"""

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<style>
body{font-family:sans-serif;margin:1.5em;max-width:70em}
#drop{border:2px dashed #888;border-radius:8px;padding:1.5em;text-align:center;cursor:pointer}
#drop.over{background:#eef}
#query img{max-height:10em;margin-top:.5em}
#results{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.8em;margin-top:1em}
.match{margin:0;border:1px solid #ccc;border-radius:6px;padding:5px;text-align:center}
.match img{max-width:160px;max-height:160px}
.match figcaption{font-size:.85em}
#status.error{color:#b00}
#issues{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.8em;margin-top:1em}
#map-box{position:relative}
#map{width:100%;border:1px solid #ccc;border-radius:6px}
#map .point{cursor:pointer;stroke:#fff;stroke-width:.5}
#map .point:hover{stroke:#000;stroke-width:2}
#map .ring{fill:none;stroke:#d00;stroke-width:2;pointer-events:none}
#map line{stroke:#999;stroke-width:1;pointer-events:none}
#map-tip{position:absolute;display:none;background:#fff;border:1px solid #888;border-radius:4px;padding:3px;
font-size:.8em;pointer-events:none;text-align:center}
#map-tip img{display:block;max-width:120px;max-height:120px;margin:auto}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:50%;margin:0 .2em 0 .8em}
</style></head>
<body>
<h1>{{title}}</h1>
<p><label>matches <select id="k"></select></label>
<label>ranker <select id="ranker"></select></label>
<span id="attributes"></span></p>
<div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*"></div>
<p id="status"></p><div id="query"></div>
<div id="results"></div>
<details id="issues-view"><summary>label issues: the images whose label looks wrong</summary>
<p id="issues-status">loading ...</p><div id="issues"></div></details>
<details id="map-view"><summary>map: every reference in the plane (hover to see it, click to query with it)</summary>
<p id="map-status">loading ...</p><p id="map-legend"></p>
<div id="map-box"><svg id="map" viewBox="0 0 1000 700"></svg><div id="map-tip"></div></div></details>
<script>
const $ = id => document.getElementById(id);
for (const n of [1, 3, 5, 10, 20, 50]) $("k").add(new Option(n, n, n === 5, n === 5));
let maxUploadBytes = Infinity;
fetch("/health").then(r => r.json()).then(h => {
  maxUploadBytes = h.max_upload_bytes;
  for (const name of h.rankers) $("ranker").add(new Option(name, name, false, name === h.default_ranker));
  if (h.attributes.length) $("attributes").append("or combine attributes:");
  for (const name of h.attributes) {
    const box = Object.assign(document.createElement("input"), {type: "checkbox", value: name, id: "attr-" + name});
    const label = Object.assign(document.createElement("label"), {htmlFor: box.id, textContent: name});
    $("attributes").append(" ", box, label);
  }
});
function show(status, error) { $("status").textContent = status; $("status").className = error ? "error" : ""; }
async function search(file) {
  $("results").replaceChildren();
  if (file.size > maxUploadBytes) {
    $("query").replaceChildren();
    show("Not sent: " + file.name + " is " + file.size.toLocaleString("en") + " bytes, over the service's " +
         maxUploadBytes.toLocaleString("en") + "-byte limit", true);
    return;
  }
  $("query").replaceChildren(Object.assign(document.createElement("img"), {src: URL.createObjectURL(file)}));
  show("searching ...");
  const form = new FormData();
  form.append("image", file); form.append("k", $("k").value); form.append("ranker", $("ranker").value);
  const picked = [...document.querySelectorAll("#attributes input:checked")].map(box => box.value);
  if (picked.length) form.append("attributes", picked.join(","));
  const response = await fetch("/query", {method: "POST", body: form});
  const body = await response.json();
  if (!response.ok) { show("Error " + response.status + ": " + body.detail, true); return; }
  const t = body.timings_ms;
  show(body.results.length + " matches (" + body.ranker + "): decode " + t.decode.toFixed(1) + " ms, network " +
       t.network.toFixed(1) + " ms, search " + t.search.toFixed(1) + " ms" +
       (t.wait > 1 ? " (waited " + t.wait.toFixed(0) + " ms)" : ""));
  body.results.forEach((m, i) => {
    const fig = document.createElement("figure"); fig.className = "match";
    const img = Object.assign(document.createElement("img"), {src: "/images/" + m.id + "?thumb=1", alt: m.key});
    const link = Object.assign(document.createElement("a"), {href: "/images/" + m.id, target: "_blank"});
    link.append(img);
    const caption = document.createElement("figcaption");
    caption.textContent = (i + 1) + ". " + m.key.split("/").pop() + " (" + m.label + ") - distance " +
      m.distance.toPrecision(4) +
      (m.probability === undefined ? "" : ", P(match) " + m.probability.toFixed(3));
    fig.append(link, caption); $("results").append(fig);
  });
}
function figure(id, alt, text) {
  const fig = document.createElement("figure"); fig.className = "match";
  const caption = Object.assign(document.createElement("figcaption"), {textContent: text});
  if (id !== null) {
    const link = Object.assign(document.createElement("a"), {href: "/images/" + id, target: "_blank"});
    link.append(Object.assign(document.createElement("img"), {src: "/images/" + id + "?thumb=1", alt: alt}));
    fig.append(link);
  }
  fig.append(caption); return fig;
}
$("issues-view").addEventListener("toggle", async () => {
  if (!$("issues-view").open || $("issues").childElementCount) return;
  const body = await (await fetch("/label-issues")).json();
  $("issues-status").textContent = body.available ? body.suspects.length + " most suspect images, from " + body.path
    : "No label_issues.csv yet: run A6_findLabelIssues.py.";
  for (const s of body.suspects) {
    const fig = figure(s.id, s.key, s.rank + ". " + s.key + " (" + s.split + "): given " + s.given_label + " (p " +
      Number(s.p_given_label).toFixed(2) + "), suggested " + s.suggested_label);
    fig.classList.add("suspect"); $("issues").append(fig);
  }
});
const MAP_W = 1000, MAP_H = 700, MAP_PAD = 15;
function svgNode(tag, attributes) {
  const node = document.createElementNS($("map").namespaceURI, tag);  // the page's own <svg>: SVG's namespace
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}
async function queryReference(point) {  // the reference's own file, through the dropped-file path
  show("fetching " + point.key + " ...");
  const blob = await (await fetch("/images/" + point.id)).blob();
  search(new File([blob], point.key.split("/").pop(), {type: blob.type}));
}
function showTip(point, node) {
  const tip = $("map-tip"), box = $("map").getBoundingClientRect(), at = node.getBoundingClientRect();
  const img = Object.assign(document.createElement("img"), {src: "/images/" + point.id + "?thumb=1", alt: point.key});
  tip.replaceChildren(img, point.key + (point.suspect ? " (label issue?)" : ""));
  tip.style.left = (at.right - box.left + 8) + "px"; tip.style.top = (at.bottom - box.top + 8) + "px";
  tip.style.display = "block";
}
$("map-view").addEventListener("toggle", async () => {
  if (!$("map-view").open || $("map").childElementCount) return;
  const body = await (await fetch("/map")).json();
  if (!body.available) { $("map-status").textContent = body.reason; return; }
  const labels = [...new Set(body.points.map(p => p.label))].sort();
  const hue = i => Math.round(200 + i * 360 / labels.length) % 360;  // the first blue, away from the rings' red
  const colour = Object.fromEntries(labels.map((l, i) => [l, "hsl(" + hue(i) + ",70%,45%)"]));
  $("map-status").textContent = body.points.length + " references mapped with " + body.method + " (" +
    body.points.filter(p => p.suspect).length + " label issues ringed red, " + body.duplicate_pairs.length +
    " near-duplicate links in grey), from " + body.path;
  for (const l of labels) {
    $("map-legend").append(Object.assign(document.createElement("span"), {className: "swatch"}), l || "(none)");
    $("map-legend").lastElementChild.style.background = colour[l];
  }
  const X = p => MAP_PAD + p.x * (MAP_W - 2 * MAP_PAD), Y = p => MAP_PAD + (1 - p.y) * (MAP_H - 2 * MAP_PAD);
  const map = $("map");
  for (const [a, b] of body.duplicate_pairs) {
    const p = body.points[a], q = body.points[b];
    map.append(svgNode("line", {x1: X(p), y1: Y(p), x2: X(q), y2: Y(q)}));
  }
  for (const p of body.points) {
    const dot = svgNode("circle", {class: "point", cx: X(p), cy: Y(p), r: 6, fill: colour[p.label],
                                   "data-id": p.id});
    dot.addEventListener("mouseenter", () => showTip(p, dot));
    dot.addEventListener("mouseleave", () => { $("map-tip").style.display = "none"; });
    dot.addEventListener("click", () => queryReference(p));
    map.append(dot);
    if (p.suspect) map.append(svgNode("circle", {class: "ring", cx: X(p), cy: Y(p), r: 10}));
  }
});
$("file").addEventListener("change", e => { if (e.target.files.length) search(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) search(e.dataTransfer.files[0]);
});
</script>
</body></html>
"""
