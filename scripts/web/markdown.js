// A small Markdown renderer for model replies that cannot inject HTML.
//
// It never parses HTML: it builds DOM elements from a fixed list (p, br, h1-h6, pre, code, ul, ol, li, blockquote,
// hr, table parts, strong, em, del, a) and puts every piece of text in with createTextNode, so a reply saying
// "<script>" or "<img onerror=...>" shows exactly those characters. Links keep only http(s) URLs.
// Supported: fenced code blocks, headings, nested lists, block quotes, pipe tables, rules, paragraphs (a single
// newline is a line break: models write poems and Chinese text that way); inline code, **bold**, *italic*,
// ~~strike~~ and [links](https://...). An unclosed code fence (a reply still streaming) runs to the end.
"use strict";

/** The Markdown ``source`` as a DocumentFragment of whitelisted elements and text nodes. */
function renderMarkdown(source) {
  const root = document.createDocumentFragment();
  const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      i++;
    } else if ((m = line.match(/^ {0,3}(`{3,}|~{3,})/))) {  // fenced code: verbatim up to the closing fence
      const fence = m[1], body = [];
      for (i++; i < lines.length && !lines[i].trimStart().startsWith(fence); i++) body.push(lines[i]);
      i++;  // past the closing fence
      root.append(element("pre", element("code", body.join("\n"))));
    } else if ((m = line.match(/^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/))) {
      root.append(inline(element(`h${m[1].length}`), m[2]));
      i++;
    } else if (/^ {0,3}([-*_])( *\1){2,} *$/.test(line)) {
      root.append(element("hr"));
      i++;
    } else if (/^ {0,3}>/.test(line)) {
      const quoted = [];
      for (; i < lines.length && /^ {0,3}>/.test(lines[i]); i++) quoted.push(lines[i].replace(/^ {0,3}> ?/, ""));
      root.append(element("blockquote", renderMarkdown(quoted.join("\n"))));
    } else if (listItem(line)) {
      i = list(root, lines, i);
    } else if (line.includes("|") && i + 1 < lines.length && isTableRule(lines[i + 1])) {
      i = table(root, lines, i);
    } else {  // a paragraph: lines up to a blank line or the start of another block
      const text = [line];
      for (i++; i < lines.length && lines[i].trim() && !startsBlock(lines, i); i++) text.push(lines[i]);
      root.append(inline(element("p"), text.join("\n")));
    }
  }
  return root;
}

/** An element of the whitelist, with ``content`` (a string, set as text, or a node) inside. */
function element(tag, content) {
  const node = document.createElement(tag);
  if (typeof content === "string") node.textContent = content;
  else if (content) node.append(content);
  return node;
}

/** {indent, ordered, start, text} when ``line`` is a list item ("- x", "* x", "+ x", "1. x", "1) x"). */
function listItem(line) {
  const m = line.match(/^( *)([-*+]|(\d{1,9})[.)])\s+(.*)$/);
  return m && {indent: m[1].length, ordered: m[3] !== undefined, start: Number(m[3] || 1), text: m[4],
               contentIndent: m[0].length - m[4].length};
}

function isTableRule(line) {
  return /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/.test(line) && line.includes("-");
}

function startsBlock(lines, i) {
  const line = lines[i];
  return /^ {0,3}(`{3,}|~{3,}|#{1,6}\s|>)/.test(line) || listItem(line) || /^ {0,3}([-*_])( *\1){2,} *$/.test(line) ||
         (line.includes("|") && i + 1 < lines.length && isTableRule(lines[i + 1]));
}

/** A list starting at ``lines[i]`` appended to ``parent``; returns the index after it. Lines indented under an
 * item (a nested list, a second paragraph, a code block) are rendered as blocks inside that item. */
function list(parent, lines, i) {
  const first = listItem(lines[i]);
  const node = element(first.ordered ? "ol" : "ul");
  if (first.ordered && first.start !== 1) node.start = first.start;
  while (i < lines.length) {
    const item = listItem(lines[i]);
    if (!item || item.ordered !== first.ordered || item.indent > first.indent + 1) break;
    const li = inline(element("li"), item.text), nested = [];
    for (i++; i < lines.length; i++) {
      const line = lines[i], indent = line.length - line.trimStart().length;
      if (line.trim() && indent < item.contentIndent && !(listItem(line) && indent > item.indent)) break;
      if (!line.trim() && !(lines[i + 1] || "").startsWith(" ".repeat(item.contentIndent))) break;
      nested.push(line.slice(Math.min(indent, item.contentIndent)));
    }
    if (nested.length) li.append(renderMarkdown(nested.join("\n")));
    node.append(li);
    while (i < lines.length && !lines[i].trim() && listItem(lines[i + 1] || "")) i++;  // a loose list goes on
  }
  parent.append(node);
  return i;
}

/** A pipe table starting at ``lines[i]`` (header, rule, rows) appended to ``parent``; returns the index after it. */
function table(parent, lines, i) {
  const cells = (line) => line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((cell) => cell.trim());
  const head = element("tr");
  for (const cell of cells(lines[i])) head.append(inline(element("th"), cell));
  const body = element("tbody");
  for (i += 2; i < lines.length && lines[i].includes("|") && lines[i].trim(); i++) {
    const row = element("tr");
    for (const cell of cells(lines[i])) row.append(inline(element("td"), cell));
    body.append(row);
  }
  const node = element("table", element("thead", head));
  node.append(body);
  parent.append(node);
  return i;
}

// Inline spans, earliest match first: `code`, **bold**, ~~strike~~, *italic*, [text](url).
const INLINE = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*(?!\*)|~~(?=\S)([\s\S]*?\S)~~|\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)|\[([^\]\n]+)\]\(([^()\s]+)\)/g;

/** ``text`` with its inline spans appended to ``parent`` (newlines become <br>); returns ``parent``. */
function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    plain(parent, text.slice(last, m.index));
    if (m[1]) parent.append(element("code", m[2]));
    else if (m[3] !== undefined) parent.append(inline(element("strong"), m[3]));
    else if (m[4] !== undefined) parent.append(inline(element("del"), m[4]));
    else if (m[5] !== undefined) parent.append(inline(element("em"), m[5]));
    else if (/^https?:\/\//i.test(m[7])) {  // no javascript:, data: or relative URLs
      const link = inline(element("a"), m[6]);
      link.href = m[7];
      link.rel = "noopener noreferrer";
      link.target = "_blank";
      parent.append(link);
    } else plain(parent, m[0]);
    last = m.index + m[0].length;
  }
  plain(parent, text.slice(last));
  return parent;
}

function plain(parent, text) {
  text.split("\n").forEach((line, k) => {
    if (k) parent.append(element("br"));
    if (line) parent.append(document.createTextNode(line));
  });
}
