/* pyro-vae latent space explorer: the decoder of a run, in plain JavaScript.
 *
 * weights.js (written by `pyro-vae explore`) sets window.PYRO_VAE_EXPLORER: the decoder's linear layers
 * (float32, base64, weight [out, in] row-major as torch stores it), the held-out images' codes and the
 * map's projection. This file draws the page and exposes window.explorer:
 *   explorer.ready      a Promise, resolved once the weights and images are loaded and the page drawn;
 *   explorer.decode(z)  z: an array of zDim numbers (M2: explorer.decode(z, y)); returns E[x | z] as a flat
 *                       array of C*H*W numbers in [0, 1], in the decoder's order (channel, row, column);
 *   explorer.setZ(z), explorer.select(i), explorer.frameTimes (ms per drawn frame).
 * Nothing is fetched: the page works from a file:// URL, offline.
 */
(function () {
  "use strict";

  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                   "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const SLIDERS = 10;           // latent coordinates with a slider (the first ones)
  const MAP_MARGIN = 34;        // pixels left of and below the map's plot area, for the axes
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ numbers

  function floats(b64) {
    const text = atob(b64);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return new Float32Array(bytes.buffer);  // little-endian, as written
  }

  const softplus = (v) => (v > 20 ? v : Math.log1p(Math.exp(v)));  // torch's Softplus (threshold 20)

  // E[x | z] from the last layer's output, by the name weights.js gives
  const MEANS = {
    sigmoid: (l) => 1 / (1 + Math.exp(-l)),
    // continuous Bernoulli: 1/2 + 1/(2 tanh(l/2)) - 1/l, its Taylor series near 0 (as pyro_vae's ContinuousBernoulli)
    "continuous-bernoulli": (l) => (Math.abs(l) < 0.1 ? 0.5 + l / 12 - (l * l * l) / 720
                                                       : 0.5 + 0.5 / Math.tanh(l / 2) - 1 / l),
  };

  function makeDecoder(spec) {
    const layers = spec.layers.map((l) => ({ n: l.in, m: l.out, w: floats(l.weight), b: floats(l.bias),
                                             softplus: l.softplus, out: new Float64Array(l.out) }));
    const mean = MEANS[spec.mean];
    if (!mean) throw new Error("unknown decoder mean " + spec.mean);
    const input = new Float64Array(layers[0].n);
    return function (values) {  // values: layers[0].n numbers -> Float64Array of E[x | z]
      input.set(values);
      let x = input;
      for (const l of layers) {
        const y = l.out, w = l.w, n = l.n;
        const n4 = n - (n % 4);
        for (let i = 0; i < l.m; i++) {
          const row = i * n;
          let s0 = 0, s1 = 0, s2 = 0, s3 = 0;  // four partial sums: the loop runs about twice as fast
          for (let j = 0; j < n4; j += 4) {
            s0 += w[row + j] * x[j];
            s1 += w[row + j + 1] * x[j + 1];
            s2 += w[row + j + 2] * x[j + 2];
            s3 += w[row + j + 3] * x[j + 3];
          }
          for (let j = n4; j < n; j++) s0 += w[row + j] * x[j];
          const s = l.b[i] + (s0 + s1) + (s2 + s3);
          y[i] = l.softplus ? softplus(s) : s;
        }
        x = y;
      }
      const result = new Float64Array(x.length);
      for (let i = 0; i < x.length; i++) result[i] = mean(x[i]);
      return result;
    };
  }

  // ------------------------------------------------------------------ the model's pieces

  function model(data) {
    const d = data.zDim, k = data.numClasses;
    const net = makeDecoder(data.decoder);
    const code = new Float64Array(d + k);
    function decode(z, y) {
      if (!z || z.length !== d) throw new Error("decode(z): z must hold " + d + " numbers");
      code.fill(0);
      code.set(z);
      if (k > 0) code[d + (y === undefined ? 0 : y)] = 1;  // M2: [z, onehot(y)]
      return net(code);
    }
    const p = data.points;
    return { d, k, decode, count: p.count, means: floats(p.mean), stds: floats(p.std), labels: p.labels,
             classes: p.classes, shape: data.shape, size: data.shape.reduce((a, b) => a * b, 1) };
  }

  function projection(spec, d) {
    const a = spec.axes, c = spec.center;
    function project(z) {  // u = P (z - c)
      const u = [0, 0];
      for (let r = 0; r < 2; r++) for (let j = 0; j < d; j++) u[r] += a[r][j] * (z[j] - c[j]);
      return u;
    }
    function lift(u, base) {  // z = base + P^T (u - P (base - c)): base moved within the map's plane
      const pb = project(base), z = Float64Array.from(base);
      for (let r = 0; r < 2; r++) for (let j = 0; j < d; j++) z[j] += a[r][j] * (u[r] - pb[r]);
      return z;
    }
    return { project, lift, origin: project(new Float64Array(d)) };
  }

  // ------------------------------------------------------------------ images on canvases

  const scratch = {};  // one small canvas and its pixels per image shape, reused by every frame

  function drawPixels(canvas, values, shape) {
    const [C, H, W] = shape, key = shape.join("x");
    if (!scratch[key]) {
      const small = document.createElement("canvas");
      small.width = W;
      small.height = H;
      const ctx = small.getContext("2d");
      scratch[key] = { small, ctx, img: ctx.createImageData(W, H) };
    }
    const { small, ctx, img } = scratch[key], px = img.data;
    for (let p = 0; p < H * W; p++) {
      for (let ch = 0; ch < 3; ch++) {
        const v = C === 1 ? 1 - values[p] : values[ch * H * W + p];  // grey: ink dark on white, as the figures
        px[4 * p + ch] = 255 * v;  // a Uint8ClampedArray rounds and clamps
      }
      px[4 * p + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    const out = canvas.getContext("2d");
    out.imageSmoothingEnabled = false;
    out.drawImage(small, 0, 0, canvas.width, canvas.height);
  }

  function loadSprite(images, shape) {  // the held-out images, from one PNG data URL
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        const canvas = document.createElement("canvas");
        canvas.width = img.width;
        canvas.height = img.height;
        const ctx = canvas.getContext("2d");
        ctx.drawImage(img, 0, 0);
        const rgba = ctx.getImageData(0, 0, img.width, img.height).data;
        resolve((i) => spritePixels(rgba, img.width, images.columns, shape, i));
      };
      img.onerror = () => reject(new Error("the images in weights.js could not be decoded"));
      img.src = images.png;
    });
  }

  function spritePixels(rgba, width, columns, shape, i) {
    const [C, H, W] = shape, x0 = (i % columns) * W, y0 = Math.floor(i / columns) * H;
    const out = new Float64Array(C * H * W);
    for (let ch = 0; ch < C; ch++)
      for (let r = 0; r < H; r++)
        for (let c = 0; c < W; c++) out[ch * H * W + r * W + c] = rgba[4 * ((y0 + r) * width + x0 + c) + ch] / 255;
    return out;
  }

  // ------------------------------------------------------------------ the latent map

  function mapGeometry(points, origin, canvas) {
    let lo = [origin[0] - 3, origin[1] - 3], hi = [origin[0] + 3, origin[1] + 3];  // the prior's 3 sigma, at least
    for (const u of points) for (let r = 0; r < 2; r++) { lo[r] = Math.min(lo[r], u[r]); hi[r] = Math.max(hi[r], u[r]); }
    const span = 1.06 * Math.max(hi[0] - lo[0], hi[1] - lo[1]);
    const mid = [(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2];
    const side = Math.min(canvas.width, canvas.height) - MAP_MARGIN - 6;
    const scale = side / span, left = MAP_MARGIN, top = 6;
    return {
      side, scale, left, top, lo: [mid[0] - span / 2, mid[1] - span / 2], span,
      toCanvas: (u) => [left + (u[0] - (mid[0] - span / 2)) * scale, top + side - (u[1] - (mid[1] - span / 2)) * scale],
      fromCanvas: (x, y) => [mid[0] - span / 2 + (x - left) / scale, mid[1] - span / 2 + (top + side - y) / scale],
    };
  }

  function drawMapBackground(g, points, labels, origin, names, canvas) {
    const bg = document.createElement("canvas");
    bg.width = canvas.width;
    bg.height = canvas.height;
    const ctx = bg.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, bg.width, bg.height);
    ctx.strokeStyle = "#bbb";
    ctx.setLineDash([4, 4]);
    const o = g.toCanvas(origin);
    for (const r of [1, 2, 3]) { ctx.beginPath(); ctx.arc(o[0], o[1], r * g.scale, 0, 2 * Math.PI); ctx.stroke(); }
    ctx.setLineDash([]);
    ctx.fillStyle = "#999";
    ctx.font = "11px sans-serif";
    ctx.fillText("prior 3\u03c3", o[0] + 3 * g.scale * 0.71 + 2, o[1] - 3 * g.scale * 0.71 - 2);
    ctx.globalAlpha = 0.75;
    points.forEach((u, i) => {
      const p = g.toCanvas(u);
      ctx.fillStyle = labels ? PALETTE[labels[i] % PALETTE.length] : "#1f77b4";
      ctx.beginPath();
      ctx.arc(p[0], p[1], 2.2, 0, 2 * Math.PI);
      ctx.fill();
    });
    ctx.globalAlpha = 1;
    drawAxes(ctx, g, names);
    return bg;
  }

  function niceStep(span) {
    const raw = span / 6, p = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / p;
    return p * (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10);
  }

  function drawAxes(ctx, g, names) {
    ctx.strokeStyle = "#444";
    ctx.strokeRect(g.left, g.top, g.side, g.side);
    ctx.fillStyle = "#444";
    ctx.font = "11px sans-serif";
    const step = niceStep(g.span);
    for (let r = 0; r < 2; r++) {
      for (let t = Math.ceil(g.lo[r] / step) * step; t <= g.lo[r] + g.span; t += step) {
        const p = g.toCanvas(r === 0 ? [t, g.lo[1]] : [g.lo[0], t]), label = (+t.toFixed(6)).toString();
        ctx.textAlign = r === 0 ? "center" : "right";
        if (r === 0) { ctx.fillRect(p[0], p[1], 1, 4); ctx.fillText(label, p[0], p[1] + 14); }
        else { ctx.fillRect(p[0] - 4, p[1], 4, 1); ctx.fillText(label, p[0] - 6, p[1] + 4); }
      }
    }
    ctx.textAlign = "center";
    ctx.fillText(names[0], g.left + g.side / 2, g.top + g.side + 27);
    ctx.save();
    ctx.translate(10, g.top + g.side / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(names[1], 0, 0);
    ctx.restore();
    ctx.textAlign = "left";
  }

  function mapNames(spec, d) {
    if (spec.kind === "pca") return ["PC 1", "PC 2"];
    return d === 1 ? ["z[0]", "(unused: z has one coordinate)"] : ["z[0]", "z[1]"];
  }

  function mapCaption(spec, m) {
    const n = m.count.toLocaleString("en"), what = `each dot: the mean of q(z | x) for one of ${n} held-out images` +
      (m.labels ? ", coloured by its label" : "") + ".";
    const use = " Click or drag anywhere: the decoder runs on that z. Double-click (or shift-click) a dot: pick its image.";
    if (spec.kind !== "pca") {
      const plane = m.d === 2 ? "The latent plane z = (z[0], z[1]) itself; " : "z[0] along the horizontal axis; ";
      return plane + what + " Dashed circles: the prior N(0, I) at 1, 2, 3\u03c3." + use;
    }
    const pct = spec.variance.map((v) => (100 * v).toFixed(0) + "%");
    return `A projection of the ${m.d}-dimensional codes onto their first two principal components ` +
      `(PCA of the ${n} codes: PC 1 holds ${pct[0]} of their variance, PC 2 ${pct[1]}); ${what} ` +
      `A point u of the map decodes z = z\u209b + P\u1d40(u \u2212 P(z\u209b \u2212 c)): the selected image's code ` +
      `z\u209b moved within the plane, its other ${m.d - 2} directions held at that code. ` +
      "Dashed circles: the prior N(0, I) projected, at 1, 2, 3\u03c3." + use;
  }

  // ------------------------------------------------------------------ the posterior chart

  function drawPosterior(canvas, m, i, z, limit) {
    const d = m.d, rowH = d <= 10 ? 22 : Math.max(6, Math.floor(420 / d)), text = d <= 10 ? 96 : 0;
    const height = d * rowH + 22, left = 34, width = canvas.width - left - text - 8;
    if (canvas.height !== height) canvas.height = height;
    const ctx = canvas.getContext("2d"), x = (v) => left + ((Math.max(-limit, Math.min(limit, v)) + limit) / (2 * limit)) * width;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "#eef1f4";
    ctx.fillRect(x(-3), 0, x(3) - x(-3), d * rowH);
    ctx.fillStyle = "#c9d3dd";
    ctx.fillRect(x(-1), 0, x(1) - x(-1), d * rowH);
    ctx.fillStyle = "#7a8a9a";
    ctx.fillRect(x(0), 0, 1, d * rowH);
    ctx.font = "11px sans-serif";
    for (let j = 0; j < d; j++) {
      const mu = m.means[i * d + j], sd = m.stds[i * d + j], cy = j * rowH + rowH / 2;
      ctx.fillStyle = "#1f77b4";
      ctx.fillRect(x(mu - sd), cy - Math.max(1, rowH / 6), Math.max(1, x(mu + sd) - x(mu - sd)), Math.max(2, rowH / 3));
      ctx.fillRect(x(mu) - 1, cy - rowH / 3, 3, (2 * rowH) / 3);
      ctx.fillStyle = "#d62728";
      ctx.fillRect(x(z[j]), j * rowH + 1, 2, rowH - 2);
      ctx.fillStyle = "#444";
      if (d <= 10 || j % 5 === 0) ctx.fillText("z[" + j + "]", 0, cy + 4);
      if (text) ctx.fillText(`\u03bc ${mu.toFixed(2)}  \u03c3 ${sd.toFixed(2)}`, left + width + 8, cy + 4);
    }
    ctx.fillStyle = "#444";
    ctx.textAlign = "center";
    for (const t of [-3, 0, 3]) ctx.fillText((t === 0 ? "0" : (t > 0 ? "+" : "\u2212") + "3\u03c3"), x(t), d * rowH + 15);
    ctx.fillText("\u2212" + limit, x(-limit) + 8, d * rowH + 15);
    ctx.fillText("+" + limit, x(limit) - 8, d * rowH + 15);
    ctx.textAlign = "left";
  }

  // ------------------------------------------------------------------ sliders

  function buildSliders(count, limit, onInput) {
    const pct = (v) => (v + limit) / (2 * limit);
    const at = (f) => `calc(6px + (100% - 12px) * ${f})`;  // where the thumb's centre is at fraction f
    for (const [v, name] of [[-3, "\u22123\u03c3"], [0, "0"], [3, "+3\u03c3"]]) {
      const s = document.createElement("span");
      s.textContent = name;
      s.style.left = at(pct(v));
      $("slider-scale").appendChild(s);
    }
    const inputs = [];
    for (let j = 0; j < count; j++) {
      const row = document.createElement("div");
      row.className = "slider-row";
      row.innerHTML = `<label for="z${j}">z[${j}]</label><div class="track"><div class="band"></div><div class="line"></div>` +
        `<div class="zero"></div><input id="z${j}" type="range" min="${-limit}" max="${limit}" step="0.01"></div><output></output>`;
      row.querySelector(".band").style.left = at(pct(-3));
      row.querySelector(".band").style.width = `calc((100% - 12px) * ${pct(3) - pct(-3)})`;
      row.querySelector(".zero").style.left = at(pct(0));
      const input = row.querySelector("input");
      input.addEventListener("input", () => onInput(j, +input.value));
      $("sliders").appendChild(row);
      inputs.push({ input, output: row.querySelector("output") });
    }
    return (z) => inputs.forEach((s, j) => { s.input.value = z[j]; s.output.textContent = z[j].toFixed(2); });
  }

  // ------------------------------------------------------------------ the page

  function describeRun(data, m) {
    const r = data.run, kind = m.k > 0 ? `M2 (${m.k} classes)` : "VAE";
    const elbo = r.valElbo == null ? "" : `, validation ELBO ${r.valElbo.toFixed(2)} nats/image`;
    return `${kind}, z of ${m.d} dimensions, ${r.likelihood} likelihood, MLP decoder ` +
      `${[m.d + m.k, ...r.hidden.slice().reverse(), m.size].join("\u2192")}, ${r.guide} guide, ` +
      `${r.epochs} epochs on ${r.data}${elbo}. Map: ${r.images}.`;
  }

  function drawMarkers(ctx, selected, current) {  // a ring at the selected image's code, a cross at z
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.arc(selected[0], selected[1], 6, 0, 2 * Math.PI);
    ctx.stroke();
    ctx.strokeStyle = "#d62728";
    ctx.beginPath();
    ctx.moveTo(current[0] - 9, current[1]); ctx.lineTo(current[0] + 9, current[1]);
    ctx.moveTo(current[0], current[1] - 9); ctx.lineTo(current[0], current[1] + 9);
    ctx.stroke();
    ctx.lineWidth = 1;
  }

  function frameTimeText(frameTimes, k) {
    const recent = frameTimes.slice(-31).sort((a, b) => a - b), median = recent[recent.length >> 1];
    return `decode + draw: ${median.toFixed(1)} ms a frame (median of the last ${recent.length})` +
      (k > 0 ? `, ${k + 1} decodes each` : "");
  }

  function imageInfo(m, i) {
    const label = m.labels ? `label ${m.labels[i]}` : "no label";
    return `image ${i} of ${m.count}: ${label}` +
      (m.k > 0 ? `; q(y | x) picks ${m.classes[i]}, the style is q(z | x, y = ${m.classes[i]})'s mean` : "") +
      ". Reconstruction: E[x | z] at the mean of q(z | x).";
  }

  function sliderLimit(m) {  // the sliders' and the chart's range: at least +-4, wide enough for the codes, at most +-8
    let maxAbs = 3;
    for (let i = 0; i < m.count * m.d; i++) maxAbs = Math.max(maxAbs, Math.abs(m.means[i]));
    return Math.min(8, Math.max(4, Math.ceil(maxAbs)));
  }

  function writeTexts(data, m, limit) {
    $("run-name").textContent = data.run.name;
    $("run-info").textContent = describeRun(data, m);
    $("map-caption").textContent = mapCaption(data.projection, m);
    $("z-dim").textContent = m.d;
    $("sliders-title").textContent = m.d > SLIDERS ? `The first ${SLIDERS} of ${m.d} latent coordinates` : "Latent coordinates";
    $("sliders-caption").textContent = `Shaded: the prior's \u00b13\u03c3 (p(z) = N(0, I), \u03c3 = 1); ` +
      `the sliders span \u00b1${limit}.`;
    if (m.labels) buildLegend(m.labels);
  }

  // click or drag: onPoint(u) for each position u on the map; shift-click or double-click: onPick(u)
  function wireMap(canvas, geometry, onPoint, onPick) {
    function mapPoint(e) {
      const r = canvas.getBoundingClientRect();  // the canvas may be drawn smaller than its pixels (narrow pages)
      return geometry.fromCanvas((e.clientX - r.left - canvas.clientLeft) * (canvas.width / canvas.clientWidth),
                                 (e.clientY - r.top - canvas.clientTop) * (canvas.height / canvas.clientHeight));
    }
    let dragging = false;
    canvas.addEventListener("pointerdown", (e) => {
      if (e.shiftKey) { onPick(mapPoint(e)); return; }
      dragging = true;
      try { canvas.setPointerCapture(e.pointerId); } catch (err) { /* synthetic events have no capture */ }
      onPoint(mapPoint(e));
    });
    canvas.addEventListener("pointermove", (e) => { if (dragging) onPoint(mapPoint(e)); });
    const stop = () => { dragging = false; };
    canvas.addEventListener("pointerup", stop);
    canvas.addEventListener("pointercancel", stop);
    canvas.addEventListener("dblclick", (e) => onPick(mapPoint(e)));
  }

  function wirePicker(select, selected, count) {
    $("image-index").max = count - 1;
    $("image-index").addEventListener("change", () => select(+$("image-index").value));
    $("prev").addEventListener("click", () => select(selected() - 1));
    $("next").addEventListener("click", () => select(selected() + 1));
    $("random").addEventListener("click", () => select(Math.floor(Math.random() * count)));
  }

  function nearest(points, u) {
    let best = 0, bestD = Infinity;
    points.forEach((p, i) => { const dd = (p[0] - u[0]) ** 2 + (p[1] - u[1]) ** 2; if (dd < bestD) { bestD = dd; best = i; } });
    return best;
  }

  function start(data) {
    const m = model(data), proj = projection(data.projection, m.d), limit = sliderLimit(m);
    const codeOf = (i) => Float64Array.from(m.means.subarray(i * m.d, (i + 1) * m.d));
    const points = Array.from({ length: m.count }, (_, i) => proj.project(codeOf(i)));
    const state = { z: new Float64Array(m.d), y: 0, selected: 0, image: null }, frameTimes = [];
    const canvas = $("map"), geometry = mapGeometry(points, proj.origin, canvas);
    const background = drawMapBackground(geometry, points, m.labels, proj.origin, mapNames(data.projection, m.d), canvas);
    const setSliders = buildSliders(Math.min(SLIDERS, m.d), limit, (j, v) => { state.z[j] = v; render(); });
    const classCells = m.k > 0 ? buildClassRow(m.k, (y) => { state.y = y; render(); }) : [];
    let pixelsOf = null;

    function render() {  // one frame: decode z (M2: under each class too) and redraw what depends on it
      const t0 = performance.now();
      state.image = m.decode(state.z, state.y);
      drawPixels($("decoded"), state.image, m.shape);
      classCells.forEach((cell, y) => {
        drawPixels(cell.canvas, m.decode(state.z, y), m.shape);
        cell.div.classList.toggle("selected", y === state.y);
      });
      setSliders(state.z);
      const ctx = canvas.getContext("2d");
      ctx.drawImage(background, 0, 0);
      drawMarkers(ctx, geometry.toCanvas(points[state.selected]), geometry.toCanvas(proj.project(state.z)));
      drawPosterior($("posterior"), m, state.selected, state.z, limit);
      frameTimes.push(performance.now() - t0);
      $("frame-time").textContent = frameTimeText(frameTimes, m.k);
    }

    function select(i) {  // a held-out image: its code becomes z (M2: its class y)
      i = Math.max(0, Math.min(m.count - 1, Math.round(i)));
      Object.assign(state, { selected: i, z: codeOf(i), y: m.k > 0 ? m.classes[i] : 0 });
      $("image-index").value = i;
      if (pixelsOf) drawPixels($("original"), pixelsOf(i), m.shape);
      drawPixels($("reconstruction"), m.decode(codeOf(i), state.y), m.shape);
      $("image-info").textContent = imageInfo(m, i);
      render();
    }

    wireMap(canvas, geometry, (u) => { state.z = proj.lift(u, codeOf(state.selected)); render(); },
            (u) => select(nearest(points, u)));
    wirePicker(select, () => state.selected, m.count);
    writeTexts(data, m, limit);
    const ready = loadSprite(data.images, m.shape).then((pixels) => { pixelsOf = pixels; select(0); });
    select(0);
    return {
      ready: ready.then(() => api),
      decode: (z, y) => Array.from(m.decode(z, y === undefined ? state.y : y)),
      setZ: (z) => { state.z = Float64Array.from(z); render(); },
      select,
      get z() { return Array.from(state.z); },
      get y() { return state.y; },
      get image() { return Array.from(state.image); },
      frameTimes,
      zDim: m.d, numClasses: m.k, shape: m.shape.slice(), count: m.count,
    };
  }

  function buildClassRow(k, onPick) {
    $("classes").hidden = false;
    const cells = [];
    for (let y = 0; y < k; y++) {
      const div = document.createElement("div"), canvas = document.createElement("canvas");
      div.className = "class-cell";
      canvas.width = canvas.height = 52;
      div.appendChild(canvas);
      div.appendChild(document.createTextNode("y = " + y));
      div.addEventListener("click", () => onPick(y));
      $("class-row").appendChild(div);
      cells.push({ div, canvas });
    }
    return cells;
  }

  function buildLegend(labels) {
    const seen = Array.from(new Set(labels)).sort((a, b) => a - b);
    for (const l of seen) {
      const s = document.createElement("span");
      s.textContent = l;
      s.style.setProperty("--colour", PALETTE[l % PALETTE.length]);
      $("legend").appendChild(s);
    }
  }

  function fail(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
    return { ready: Promise.reject(new Error(message)), decode() { throw new Error(message); } };
  }

  let api;
  const data = window.PYRO_VAE_EXPLORER;
  if (!data) {
    api = fail("weights.js is missing or broken: write the page again with pyro-vae explore RUN --out DIR.");
    api.ready.catch(() => {});
  } else {
    try {
      api = start(data);
    } catch (err) {
      api = fail("The explorer could not start: " + err.message);
      api.ready.catch(() => {});
    }
  }
  window.explorer = api;
})();
