// Node's `ws` (with permessage-deflate) as a peer of fastgw's end-to-end tests
// (tests/e2e/test_deflate.py). Install: npm install --prefix tests/node
//
//   node peer.js server BITS   a backend on 127.0.0.1 (server_max_window_bits=BITS, every message
//                              compressed): echoes each message, in 3 fragments on a path with
//                              /frag; prints {"port"} then {"offer", "answer"} per connection
//   node peer.js client URL    a client: sends text and binary messages of 10 B to 1 MiB, whole
//                              and in 3 fragments, checks the echoes; prints one JSON result
'use strict';

const crypto = require('crypto');
const { WebSocket, WebSocketServer } = require('ws');

const SIZES = [10, 1000, 65536, 1 << 20];

function payload(size, binary) {
  if (binary) {
    const b = Buffer.alloc(size);
    for (let i = 0; i < size; i++) b[i] = (i * 7 + (i >> 12)) & 0xff;
    return b;
  }
  return Buffer.from('fastgw deflate '.repeat(Math.ceil(size / 15)).slice(0, size));
}

function sendFragments(ws, data, binary) {
  const third = Math.floor(data.length / 3);
  ws.send(data.subarray(0, third), { binary, fin: false });
  ws.send(data.subarray(third, 2 * third), { binary, fin: false });
  ws.send(data.subarray(2 * third), { binary, fin: true });
}

function sha(data) {
  return crypto.createHash('sha256').update(data).digest('hex');
}

function server(bits) {
  const wss = new WebSocketServer({
    host: '127.0.0.1', port: 0,
    perMessageDeflate: { serverMaxWindowBits: bits, threshold: 0 },
  });
  wss.on('headers', (headers, req) => {
    const answer = headers.find((h) => h.toLowerCase().startsWith('sec-websocket-extensions:'));
    console.log(JSON.stringify({
      offer: req.headers['sec-websocket-extensions'] || null,
      answer: answer ? answer.slice(answer.indexOf(':') + 1).trim() : null,
    }));
  });
  wss.on('connection', (ws, req) => {
    const frag = req.url.includes('/frag');
    ws.on('message', (data, binary) => {
      if (frag && data.length >= 3) sendFragments(ws, data, binary);
      else ws.send(data, { binary });
    });
  });
  wss.on('listening', () => console.log(JSON.stringify({ port: wss.address().port })));
}

function client(url) {
  const ws = new WebSocket(url, { perMessageDeflate: { threshold: 0 }, maxPayload: 1 << 24 });
  const plan = [];
  for (const fragmented of [false, true]) {
    for (const binary of [false, true]) {
      for (const size of SIZES) plan.push({ size, binary, fragmented });
    }
  }
  const result = { answer: null, params: null, sent: [], ok: 0, errors: [] };
  let i = 0;
  const next = () => {
    if (i === plan.length) {
      ws.close(1000, 'done');
      return;
    }
    const step = plan[i];
    const data = payload(step.size, step.binary);
    result.sent.push(sha(data));
    if (step.fragmented) sendFragments(ws, data, step.binary);
    else ws.send(data, { binary: step.binary });
  };
  ws.on('upgrade', (res) => { result.answer = res.headers['sec-websocket-extensions'] || null; });
  ws.on('open', () => {
    const pmd = ws._extensions['permessage-deflate'];
    result.params = pmd ? pmd.params : null;
    next();
  });
  ws.on('message', (data, binary) => {
    const step = plan[i];
    const want = payload(step.size, step.binary);
    if (binary !== step.binary || !want.equals(data)) {
      result.errors.push(`message ${i} (${step.size} B, binary ${step.binary}) came back changed`);
    } else {
      result.ok += 1;
    }
    i += 1;
    next();
  });
  ws.on('error', (err) => { result.errors.push(String(err)); });
  ws.on('close', (code, reason) => {
    result.close = [code, reason.toString()];
    console.log(JSON.stringify(result));
  });
}

if (process.argv[2] === 'server') server(parseInt(process.argv[3], 10));
else if (process.argv[2] === 'client') client(process.argv[3]);
else { console.error('usage: peer.js server BITS | client URL'); process.exit(2); }
