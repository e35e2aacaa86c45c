/*
 * A small markdown subset rendered to DOM nodes, for model output.
 *
 * Notable:
 * - safe by construction: every piece of text becomes a Text node (createTextNode / textContent) inside
 *   elements made with createElement; nothing is ever parsed as HTML, so "<img src=x onerror=...>" in a
 *   reply is shown as those characters. No links either: a model-written href could be javascript:.
 * - blocks: paragraphs (single newlines kept as <br>), # headings, fenced code blocks (``` or ~~~; an
 *   unclosed fence runs to the end, so a block renders as code while it is still streaming), "-", "*",
 *   "+" and "1." lists. Inline: `code`, **bold**, *italic* (bold and italic nest; code is literal).
 * - re-rendered from the whole text on every streamed chunk: replies are short, and a construct that is
 *   only completed later (a closing ** or ```) then renders right without any incremental parsing.
 */
"use strict";

const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/; // anything else after ``` makes it plain text
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
// code first: what is inside backticks is literal, ** and * included. A bold run closes at a ** that no
// third * follows, so "**bold *italic***" nests rather than closing early.
const INLINE = /`([^`\n]+)`|\*\*(?=\S)([\s\S]*?\S)\*\*(?!\*)|\*(?=[^\s*])([\s\S]*?[^\s*])\*/g;

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/* Appends the inline content of text to parent: Text nodes, <code>, <strong>, <em>. */
function renderInline(parent, text) {
  let at = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > at) parent.append(document.createTextNode(text.slice(at, m.index)));
    if (m[1] !== undefined) {
      const code = el("code");
      code.textContent = m[1];
      parent.append(code);
    } else {
      const node = el(m[2] !== undefined ? "strong" : "em");
      renderInline(node, m[2] !== undefined ? m[2] : m[3]);
      parent.append(node);
    }
    at = m.index + m[0].length;
  }
  if (at < text.length) parent.append(document.createTextNode(text.slice(at)));
}

/* Lines joined by <br>, each rendered inline. */
function renderLines(parent, lines) {
  lines.forEach((line, i) => {
    if (i > 0) parent.append(el("br"));
    renderInline(parent, line);
  });
}

/* A fence closes with the same character, at least as many times, and nothing after it. */
function closesFence(line, marker) {
  const m = /^\s{0,3}(`{3,}|~{3,})\s*$/.exec(line);
  return m !== null && m[1][0] === marker[0] && m[1].length >= marker.length;
}

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || BULLET.test(line) || NUMBERED.test(line);
}

/* A DocumentFragment holding the rendering of text. */
function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (line.trim() === "") {
      i++;
    } else if ((m = FENCE.exec(line))) {
      const marker = m[1];
      const body = [];
      for (i++; i < lines.length && !closesFence(lines[i], marker); i++) body.push(lines[i]);
      i++; // the closing fence, if any
      const pre = el("pre");
      const code = el("code", m[2] ? "language-" + m[2] : "");
      code.textContent = body.join("\n");
      pre.append(code);
      out.append(pre);
    } else if ((m = HEADING.exec(line))) {
      // the page title is h1: a reply's headings sit below it
      const heading = el("h" + Math.min(m[1].length + 2, 6));
      renderInline(heading, m[2]);
      out.append(heading);
      i++;
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const numbered = !BULLET.test(line);
      const pattern = numbered ? NUMBERED : BULLET;
      const list = el(numbered ? "ol" : "ul");
      if (numbered) list.start = Number(NUMBERED.exec(line)[1]);
      while (i < lines.length && (m = pattern.exec(lines[i]))) {
        const item = [numbered ? m[2] : m[1]];
        // indented lines that start no block of their own continue the item
        for (i++; i < lines.length && /^\s+\S/.test(lines[i]) && !isBlockStart(lines[i]); i++) {
          item.push(lines[i].trim());
        }
        const li = el("li");
        renderLines(li, item);
        list.append(li);
      }
      out.append(list);
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() !== "" && (para.length === 0 || !isBlockStart(lines[i])); i++) {
        para.push(lines[i]);
      }
      const p = el("p");
      renderLines(p, para);
      out.append(p);
    }
  }
  return out;
}
