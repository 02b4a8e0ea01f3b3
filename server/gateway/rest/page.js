// flowserve's page: the served flows, and for the chosen one its samples (a scatter for a 2-D
// flow, a grid of images for an image flow) and, for a 2-D flow, its density on a grid. It uses
// only the HTTP API of the gateway that serves it, and nothing from elsewhere.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const SIZE = 560;
const GRID = 48;  // density cells per side
const IMAGES = 36;  // images drawn for an image flow
let flows = [];
let chosen = null;

function headers(extra) {
  const token = sessionStorage.getItem("flowserve-token");
  return Object.assign(token ? {"Authorization": "Bearer " + token} : {}, extra || {});
}

async function api(path, body) {
  const options = body === undefined ? {headers: headers()}
    : {method: "POST", headers: headers({"Content-Type": "application/json"}), body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const answer = await response.json();
  if (response.status === 401 || response.status === 403) {
    document.getElementById("token-box").style.display = "block";
  }
  if (!response.ok) {
    throw new Error(answer.error ? answer.error.code + ": " + answer.error.message : "HTTP " + response.status);
  }
  return answer;
}

function say(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function element(name, attributes, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  parent.appendChild(node);
  return node;
}

function isPlane(flow) { return flow.event_shape.length === 1 && flow.event_shape[0] === 2; }
function isImage(flow) { return flow.event_shape.length >= 2; }

async function listFlows() {
  const body = document.querySelector("#flows tbody");
  body.textContent = "";
  flows = (await api("/v1/models")).models;
  for (const flow of flows) {
    const row = document.createElement("tr");
    row.className = "flow";
    row.dataset.flow = flow.name;
    for (const value of [flow.name, flow.family, JSON.stringify(flow.event_shape),
                         JSON.stringify(flow.context_shape), flow.ready ? "yes" : "no"]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.appendChild(cell);
    }
    row.addEventListener("click", () => choose(flow.name));
    body.appendChild(row);
  }
  say(flows.length + " flow(s) served");
  const wanted = new URLSearchParams(location.search).get("flow");
  const first = flows.find(f => f.name === wanted) || flows.find(isPlane) || flows[0];
  if (first) await choose(first.name);
}

function contextOf(flow) {
  if (flow.context_shape.length === 0) return undefined;
  const text = document.getElementById("context").value.trim();
  if (text) return JSON.parse(text);
  const zeros = shape => shape.length === 0 ? 0 : Array.from({length: shape[0]}, () => zeros(shape.slice(1)));
  return zeros(flow.context_shape);
}

async function choose(name) {
  chosen = flows.find(f => f.name === name);
  for (const row of document.querySelectorAll("tr.flow")) {
    row.classList.toggle("chosen", row.dataset.flow === name);
  }
  await draw();
}

async function draw() {
  if (!chosen) return;
  const plot = document.getElementById("plot");
  plot.textContent = "";
  plot.dataset.flow = chosen.name;
  const count = isImage(chosen) ? IMAGES : Number(document.getElementById("count").value) || 500;
  const request = {num_samples: count, seed: Number(document.getElementById("seed").value) || 0};
  const context = contextOf(chosen);
  if (context !== undefined) request.context = context;
  say("drawing " + count + " samples of " + chosen.name + "...");
  try {
    const answer = await api("/v1/models/" + encodeURIComponent(chosen.name) + "/sample", request);
    if (isPlane(chosen)) await drawPlane(plot, answer.samples, context);
    else if (isImage(chosen)) drawImages(plot, answer.samples);
    else say(chosen.name + ": " + count + " samples drawn; only 2-D and image flows are drawn");
    plot.dataset.drawn = "true";
  } catch (error) {
    say(error.message, true);
  }
}

async function drawPlane(plot, samples, context) {
  const xs = samples.map(s => s[0]), ys = samples.map(s => s[1]);
  // A square window around the samples, 10% wider: both axes on one scale.
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const half = 0.55 * Math.max(x1 - x0, y1 - y0) || 1, center = [(x0 + x1) / 2, (y0 + y1) / 2];
  const low = [center[0] - half, center[1] - half], high = [center[0] + half, center[1] + half];
  const px = x => (x - low[0]) / (high[0] - low[0]) * SIZE;
  const py = y => SIZE - (y - low[1]) / (high[1] - low[1]) * SIZE;
  if (chosen.directions.includes("density")) {
    const points = [];
    for (let j = 0; j < GRID; j++) {
      for (let i = 0; i < GRID; i++) {
        points.push([low[0] + (i + 0.5) / GRID * (high[0] - low[0]), low[1] + (j + 0.5) / GRID * (high[1] - low[1])]);
      }
    }
    const request = {x: points};
    if (context !== undefined) request.context = context;
    const scores = (await api("/v1/models/" + encodeURIComponent(chosen.name) + "/log-likelihood", request)).log_prob;
    const finite = scores.filter(v => typeof v === "number");
    const top = Math.max(...finite), bottom = Math.max(Math.min(...finite), top - 12);
    const density = element("g", {"class": "density"}, plot);
    const cell = SIZE / GRID;
    points.forEach((point, k) => {
      const v = typeof scores[k] === "number" ? (scores[k] - bottom) / (top - bottom || 1) : 0;
      const shade = Math.round(255 - 200 * Math.max(0, v));
      element("rect", {"class": "density-cell", x: (k % GRID) * cell, y: SIZE - (Math.floor(k / GRID) + 1) * cell,
                       width: cell + 0.5, height: cell + 0.5, fill: `rgb(${shade},${shade},255)`}, density);
    });
  }
  const dots = element("g", {"class": "samples"}, plot);
  for (let k = 0; k < samples.length; k++) {
    element("circle", {"class": "sample", cx: px(xs[k]).toFixed(1), cy: py(ys[k]).toFixed(1), r: 2,
                       fill: "#d9480f", "fill-opacity": 0.7}, dots);
  }
  say(chosen.name + ": " + samples.length + " samples" +
      (chosen.directions.includes("density") ? ", over log p on a " + GRID + "x" + GRID + " grid" : ""));
}

function drawImages(plot, samples) {
  // [N, C, H, W] or [N, H, W]: the first channel, grey, each image scaled to its own range.
  const images = samples.map(s => (s.length && Array.isArray(s[0][0]) ? s[0] : s));
  const side = Math.ceil(Math.sqrt(images.length));
  const box = SIZE / side;
  const grid = element("g", {"class": "images"}, plot);
  images.forEach((image, k) => {
    const rows = image.length, cols = image[0].length;
    const values = image.flat();
    const low = Math.min(...values), high = Math.max(...values);
    const g = element("g", {"class": "image", transform: `translate(${(k % side) * box},${Math.floor(k / side) * box})`},
                      grid);
    const pixel = (box - 4) / Math.max(rows, cols);
    image.forEach((row, r) => row.forEach((value, c) => {
      const grey = Math.round(255 * (value - low) / (high - low || 1));
      element("rect", {x: 2 + c * pixel, y: 2 + r * pixel, width: pixel + 0.3, height: pixel + 0.3,
                       fill: `rgb(${grey},${grey},${grey})`}, g);
    }));
  });
  say(chosen.name + ": " + images.length + " samples");
}

document.getElementById("draw").addEventListener("click", draw);
document.getElementById("token-use").addEventListener("click", () => {
  sessionStorage.setItem("flowserve-token", document.getElementById("token").value);
  listFlows().catch(error => say(error.message, true));
});
listFlows().catch(error => say(error.message, true));
