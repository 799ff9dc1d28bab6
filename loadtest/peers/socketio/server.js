// Load-test peer: Socket.IO 4.8 on Node with @socket.io/redis-adapter, serving the chat/fan-out
// contract of the other peers in Socket.IO's own idiom:
//
// - A client connects to namespace "/" over the WebSocket transport (no long-polling, no
//   upgrade) with auth `{ token: "<uuid>:<name>", topic: "<topic>" }`. Topics are `general`,
//   `random` and `private-user-<own uuid>`; anything else refuses the connection ("44" packet).
// - The socket joins the room named after its topic.
// - Event `send` with `{ room, text }` emits `NewMessage` `{ room, username, text }` to every
//   socket in that room on every instance (sender included), through the Redis adapter. A room
//   other than the socket's topic gets an `error` event to the sender alone.
//
// Settings are the documented production ones: WebSocket transport only, the native `bufferutil`
// and `utf-8-validate` add-ons installed, per-message deflate off (Socket.IO's default), the
// default heartbeat (25 s interval, 20 s timeout).
//
// Environment: BIND_ADDR (default 127.0.0.1:3000), REDIS_URL (required).
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function parseToken(token) {
  if (typeof token !== "string") return null;
  const i = token.indexOf(":");
  if (i < 0) return null;
  const id = token.slice(0, i);
  const name = token.slice(i + 1);
  if (!UUID.test(id) || name.length === 0) return null;
  return { id: id.toLowerCase(), name };
}

function topicAllowed(user, topic) {
  return topic === "general" || topic === "random" || topic === `private-user-${user.id}`;
}

async function main() {
  const bind = process.env.BIND_ADDR || "127.0.0.1:3000";
  const redisUrl = process.env.REDIS_URL;
  if (!redisUrl) {
    console.error("peer_socketio: REDIS_URL is not set");
    process.exit(2);
  }
  const colon = bind.lastIndexOf(":");
  const host = bind.slice(0, colon);
  const port = Number(bind.slice(colon + 1));

  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  for (const c of [pub, sub]) {
    c.on("error", (e) => {
      console.error("peer_socketio: Redis error:", e.message);
    });
  }
  await Promise.all([pub.connect(), sub.connect()]);

  const httpServer = http.createServer((req, res) => {
    if (req.url === "/health") {
      res.writeHead(200, { "content-type": "text/plain" });
      res.end("OK");
      return;
    }
    res.writeHead(404);
    res.end();
  });
  const io = new Server(httpServer, {
    transports: ["websocket"],
    allowUpgrades: false,
    serveClient: false,
    adapter: createAdapter(pub, sub),
  });

  io.use((socket, next) => {
    const auth = socket.handshake.auth || {};
    const user = parseToken(auth.token);
    if (!user) return next(new Error("unauthorized"));
    if (typeof auth.topic !== "string" || !topicAllowed(user, auth.topic)) {
      return next(new Error("forbidden topic"));
    }
    socket.data.user = user;
    socket.data.topic = auth.topic;
    next();
  });

  io.on("connection", (socket) => {
    const { user, topic } = socket.data;
    socket.join(topic);
    socket.on("send", (msg) => {
      if (!msg || typeof msg.room !== "string" || typeof msg.text !== "string") {
        socket.emit("error", { message: "send needs { room, text }" });
        return;
      }
      if (msg.room !== topic) {
        socket.emit("error", {
          message: `Cannot send to room '${msg.room}' from topic '${topic}'`,
        });
        return;
      }
      io.to(topic).emit("NewMessage", { room: topic, username: user.name, text: msg.text });
    });
  });

  httpServer.listen({ host, port, backlog: 4096 }, () => {
    console.error(`peer_socketio listening on ${bind}`);
  });

  const stop = () => {
    io.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e) => {
  console.error("peer_socketio:", e);
  process.exit(1);
});
