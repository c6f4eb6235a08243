// pixelwise serve: the page. Plain script, no libraries, nothing from another host.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, image: null, truth: null, result: null, key: sessionStorage.getItem("pixelwise-key") };

function setState(name, message) {
  $("main").dataset.state = name;
  if (message !== undefined) $("status").textContent = message;
}

function headers() {
  return state.key ? { "X-API-Key": state.key } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) {
    $("key-panel").hidden = false;
    $("key-input").focus();
    throw new Error("this server needs an API key (enter it above)");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = Array.isArray(body.detail) ? body.detail.map((d) => d.msg).join("; ") : body.detail;
    } catch (_) { /* not JSON */ }
    const retry = response.headers.get("Retry-After");
    throw new Error(`${response.status}: ${detail}` + (retry ? ` (retry in ${retry} s)` : ""));
  }
  return response;
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

function swatch(color) {
  const s = el("span", { className: "swatch" });
  s.style.backgroundColor = `rgb(${color.join(",")})`;
  return s;
}

function percent(x, digits = 1) {
  return x === null || x === undefined ? "–" : `${(100 * x).toFixed(digits)}%`;
}

function stem(name) {
  return (name || "image").replace(/\.[^.]*$/, "") || "image";
}

// ---------------------------------------------------------------- start: model info and samples

async function init() {
  setState("loading", "Loading the model…");
  try {
    state.info = await (await api("/api/info")).json();
  } catch (e) {
    setState("error", `Could not load the model: ${e.message}`);
    return;
  }
  $("key-panel").hidden = true;
  const info = state.info;
  $("model-name").textContent = `· ${info.model}`;
  $("model-desc").textContent = `${info.task} segmentation, ${info.classes.length} classes; input: ${info.input.description}`;
  document.title = `pixelwise · ${info.model}`;
  const semantic = info.task === "semantic";
  for (const node of document.querySelectorAll(".semantic-only")) node.hidden = !semantic;
  if (semantic) {
    $("tile").value = info.options.tile || 0;
    $("tta").value = info.options.tta || "none";
    $("unc-kind").textContent = info.uncertainty === "mc_dropout"
      ? `(Monte-Carlo dropout, ${info.uncertainty_samples} samples)` : "(entropy of the class probabilities)";
  }
  await showSamples(info.samples);
  setState("ready", "Choose an image, drop one, or pick a sample.");
}

async function showSamples(samples) {
  const list = $("sample-list");
  list.replaceChildren();
  $("samples").hidden = samples.length === 0;
  for (const sample of samples) {
    const blob = await (await api(sample.url)).blob();
    const img = el("img", { src: URL.createObjectURL(blob), alt: "" });
    const label = sample.ground_truth_url ? `${sample.name} (with ground truth)` : sample.name;
    const button = el("button", { type: "button", className: "sample", title: label }, [img, el("span", { textContent: label })]);
    button.addEventListener("click", async () => {
      let truth = null;
      if (sample.ground_truth_url) truth = await (await api(sample.ground_truth_url)).blob();
      setTruth(truth, truth ? `${sample.name}'s ground truth` : null);
      $("image-input").value = "";
      await chooseImage(blob, sample.name);
    });
    list.append(button);
  }
}

// ---------------------------------------------------------------- choosing inputs

async function chooseImage(blob, name) {
  state.image = { blob, name };
  $("run").disabled = false;
  await segment();
}

function setTruth(blob, name) {
  state.truth = blob ? { blob, name } : null;
  $("truth-name").textContent = blob ? `using ${name}` : "";
  $("truth-clear").hidden = !blob;
  if (!blob) $("truth-input").value = "";
}

function wireInputs() {
  $("image-input").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) { setTruth(null); chooseImage(file, file.name); }
  });
  $("truth-input").addEventListener("change", (e) => {
    const file = e.target.files[0];
    setTruth(file || null, file ? file.name : null);
  });
  $("truth-clear").addEventListener("click", () => { setTruth(null); $("truth-input").focus(); });
  $("run").addEventListener("click", () => segment());
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) { setTruth(null); chooseImage(file, file.name); }
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) { setTruth(null); chooseImage(item.getAsFile(), "pasted.png"); }
  });
  for (const radio of document.querySelectorAll("input[name=view]")) radio.addEventListener("change", showView);
  $("opacity").addEventListener("input", () => {
    $("opacity-value").textContent = `${$("opacity").value}%`;
    $("layer").style.opacity = $("opacity").value / 100;
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key-input").value;
    sessionStorage.setItem("pixelwise-key", state.key);
    init();
  });
}

// ---------------------------------------------------------------- predicting

async function segment() {
  if (!state.image || $("main").dataset.state === "busy") return;
  const form = new FormData();
  form.append("image", state.image.blob, state.image.name);
  if (state.info.task === "semantic") {
    form.append("tile", $("tile").value || "0");
    form.append("tta", $("tta").value);
    form.append("uncertainty", $("uncertainty").checked ? "true" : "false");
  }
  if (state.truth) form.append("ground_truth", state.truth.blob, state.truth.name);
  setState("busy", `Segmenting ${state.image.name}…`);
  $("run").disabled = true;
  try {
    const result = await (await api("/api/predict", { method: "POST", body: form })).json();
    state.result = result;
    await render(result);
    setState("done", `Segmented ${state.image.name}: ${result.width}×${result.height} in ${Math.round(result.ms)} ms.`);
  } catch (e) {
    setState("error", `Could not segment ${state.image.name}: ${e.message}`);
  } finally {
    $("run").disabled = false;
  }
}

function loadImage(img, src) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser could not show the image"));
    img.src = src;
  });
}

async function render(result) {
  const png = (b64) => `data:image/png;base64,${b64}`;
  await loadImage($("base-img"), URL.createObjectURL(state.image.blob));
  await loadImage($("mask-img"), png(result.mask_png_base64));
  const layer = $("layer");
  layer.width = result.width;
  layer.height = result.height;
  const ctx = layer.getContext("2d");
  if (result.task === "semantic") {
    // the class colours, with class 0 left clear (as predict's overlay does)
    ctx.drawImage($("mask-img"), 0, 0);
    const pixels = ctx.getImageData(0, 0, result.width, result.height);
    const bg = state.info.classes.length ? state.info.classes[0].color : [0, 0, 0];
    const d = pixels.data;
    for (let i = 0; i < d.length; i += 4) {
      const clear = Math.abs(d[i] - bg[0]) + Math.abs(d[i + 1] - bg[1]) + Math.abs(d[i + 2] - bg[2]) < 4;
      d[i + 3] = clear ? 0 : 255;
    }
    ctx.putImageData(pixels, 0, 0);
  } else {
    // instances: predict's overlay (masks, boxes, names, scores) faded over the image
    const overlay = await loadImage(new Image(), png(result.overlay_png_base64));
    ctx.drawImage(overlay, 0, 0);
  }
  layer.style.opacity = $("opacity").value / 100;
  const hasUnc = Boolean(result.uncertainty_png_base64);
  $("view-uncertainty").disabled = !hasUnc;
  if (hasUnc) await loadImage($("unc-img"), png(result.uncertainty_png_base64));
  else if ($("view-uncertainty").checked) $("view-overlay").checked = true;
  const download = $("download");
  download.href = png(result.mask_png_base64);
  download.download = `${stem(state.image.name)}_mask.png`;
  $("result-meta").textContent = `${result.width}×${result.height}, ${Math.round(result.ms)} ms`;
  renderLegend(result.classes);
  renderInstances(result.instances);
  renderMetrics(result.metrics);
  $("result").hidden = false;
  showView();
}

function showView() {
  const view = document.querySelector("input[name=view]:checked").value;
  $("base-img").hidden = !(view === "overlay" || view === "image");
  $("layer").hidden = view !== "overlay";
  $("mask-img").hidden = view !== "mask";
  $("unc-img").hidden = view !== "uncertainty";
  $("opacity").disabled = view !== "overlay";
}

function renderLegend(classes) {
  const present = classes.filter((c) => c.pixels > 0).sort((a, b) => b.pixels - a.pixels);
  $("legend").tBodies[0].replaceChildren(...present.map((c) => el("tr", {}, [
    el("td", {}, [swatch(c.color)]),
    el("td", { textContent: c.id === 0 && state.result.task === "semantic" ? `${c.name} (clear in the overlay)` : c.name }),
    el("td", { textContent: `${percent(c.share)} (${c.pixels.toLocaleString()} px)` }),
  ])));
  const absent = classes.filter((c) => c.pixels === 0).map((c) => c.name);
  $("legend-absent").textContent = absent.length ? `Not found: ${absent.join(", ")}.` : "";
}

function renderInstances(instances) {
  $("instances-panel").hidden = !instances;
  if (!instances) return;
  $("instances").tBodies[0].replaceChildren(...instances.map((d) => el("tr", {}, [
    el("td", { textContent: d.id }), el("td", { textContent: d.class_name }),
    el("td", { textContent: d.score.toFixed(3) }), el("td", { textContent: d.box.map((v) => v.toFixed(0)).join(", ") }),
    el("td", { textContent: d.area.toLocaleString() }),
  ])));
}

function renderMetrics(metrics) {
  $("metrics-panel").hidden = !metrics;
  if (!metrics) return;
  $("metrics-summary").textContent = `mIoU ${percent(metrics.mIoU)}, pixel accuracy ${percent(metrics.pixel_acc)}, ` +
    `mean class accuracy ${percent(metrics.mean_acc)}` +
    (metrics.ignored_pixels ? `; ${metrics.ignored_pixels.toLocaleString()} ignored pixels (255) not counted.` : ".");
  const colors = Object.fromEntries(state.info.classes.map((c) => [c.id, c.color]));
  const seen = metrics.per_class.filter((c) => c.iou !== null);
  $("iou").tBodies[0].replaceChildren(...seen.map((c) => el("tr", {}, [
    el("th", { scope: "row" }, [swatch(colors[c.id] || [255, 255, 255]), ` ${c.name}`]),
    el("td", { textContent: percent(c.iou) }), el("td", { textContent: percent(c.acc) }),
    el("td", { textContent: c.pixels.toLocaleString() }),
  ])));
  // rows and columns of the classes in either mask
  const ids = seen.map((c) => c.id);
  const names = Object.fromEntries(metrics.per_class.map((c) => [c.id, c.name]));
  const head = el("tr", {}, [el("th", { scope: "col", textContent: "truth \\ predicted" }),
    ...ids.map((j) => el("th", { scope: "col", textContent: names[j] }))]);
  const rows = ids.map((i) => {
    const total = ids.reduce((s, j) => s + metrics.confusion[i][j], 0) || 1;
    return el("tr", {}, [el("th", { scope: "row", textContent: names[i] }), ...ids.map((j) => {
      const cell = el("td", { textContent: metrics.confusion[i][j].toLocaleString() });
      const share = metrics.confusion[i][j] / total;
      cell.style.backgroundColor = `rgba(${i === j ? "40, 140, 60" : "200, 60, 40"}, ${(0.08 + 0.6 * share).toFixed(3)})`;
      cell.title = `${names[i]} predicted as ${names[j]}: ${percent(share)} of ${names[i]}`;
      return cell;
    })]);
  });
  $("confusion").replaceChildren(el("thead", {}, [head]), el("tbody", {}, rows));
}

wireInputs();
init();
