// TLS (server certificates, client certificates) and a manifest with
// tokens: who may connect, send and receive what.

import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { Client, ConnectionError, RefusedError, optionsFromEnv, type ClientOptions } from "../src/index.js";
import { Broker, courier, freePort, removeDir, tempDir } from "./broker.js";

/** `courier token new`: the token and the line for the manifest. */
function tokenPair(): { token: string; hash: string } {
  const [token = "", hash = ""] = courier(["token", "new"]).trim().split("\n");
  assert.ok(token !== "" && hash.startsWith("sha256:"), `token new printed a token and its hash: ${token} ${hash}`);
  return { token, hash };
}

const clients: Client[] = [];

async function connect(options: ClientOptions): Promise<Client> {
  const client = await Client.connect({ logger: null, ...options });
  clients.push(client);
  return client;
}

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
});

describe("TLS", () => {
  let dir: string;
  let otherCa: string;
  let broker: Broker;
  let todoToken: string;
  const cert = (name: string): string => join(dir, `${name}.pem`);
  const key = (name: string): string => join(dir, `${name}-key.pem`);

  before(async () => {
    dir = tempDir("tls");
    courier(["dev-certs", dir]);
    otherCa = tempDir("other-ca");
    courier(["dev-certs", otherCa]);
    const todo = tokenPair();
    todoToken = todo.token;
    const manifest = join(dir, "courier.toml");
    writeFileSync(
      manifest,
      `[services.web]
sends = ["todo.create@1"]
receives = ["todo.created@1"]
certificates = ["CN=web"]

[services.todo]
receives = ["todo.create@1"]
sends = ["todo.created@1"]
tokens = ["${todo.hash}"]
`,
    );
    broker = await Broker.start({
      inMemory: true,
      args: [
        "--manifest",
        manifest,
        "--tls-cert",
        cert("server"),
        "--tls-key",
        key("server"),
        "--tls-client-ca",
        cert("ca"),
      ],
    });
  });

  after(async () => {
    await Promise.all(clients.splice(0).map((c) => c.close()));
    await broker.stop();
    removeDir(dir);
    removeDir(otherCa);
  });

  test("a token client and a certificate client talk over TLS; PEM as paths or as text", async () => {
    const todo = await connect({
      url: broker.addr,
      service: "todo",
      token: todoToken,
      tls: { ca: cert("ca") },
    });
    await todo.on("todo.create", async (msg) => {
      await msg.reply("todo.created", msg.json());
    });
    const web = await connect({
      url: broker.addr,
      service: "web",
      tls: { ca: readFileSync(cert("ca"), "utf8"), cert: readFileSync(cert("web")), key: key("web") },
    });
    const reply = await web.request("todo.create", { text: "milk" });
    assert.deepEqual(reply.json(), { text: "milk" });
    assert.equal(reply.sender, "todo");
  });

  test("the name in the broker's certificate is checked against the host, or the override", async () => {
    const port = broker.addr.split(":")[1]!;
    const viaName = await connect({
      url: `localhost:${port}`,
      service: "todo",
      token: todoToken,
      tls: { ca: cert("ca") },
    });
    assert.ok(viaName.connected);
    await assert.rejects(
      Client.connect({
        url: broker.addr,
        service: "todo",
        token: todoToken,
        logger: null,
        tls: { ca: cert("ca"), serverName: "elsewhere.example" },
      }),
      (e: unknown) => e instanceof ConnectionError && /does not name this host|elsewhere/.test(e.message),
    );
  });

  test("with several addresses, each broker's certificate is checked against its own address's host", async () => {
    const port = broker.addr.split(":")[1]!;
    const dead = `127.0.0.1:${await freePort()}`;
    const client = await connect({
      url: `${dead},localhost:${port}`,
      service: "todo",
      token: todoToken,
      tls: { ca: cert("ca") },
    });
    assert.equal(client.brokerAddress, `localhost:${port}`);
    await client.flush();
  });

  test("a broker certificate from another CA is refused, naming the fix", async () => {
    await assert.rejects(
      Client.connect({ url: broker.addr, service: "todo", token: todoToken, logger: null, tls: { ca: join(otherCa, "ca.pem") } }),
      (e: unknown) => e instanceof ConnectionError && /not signed by the trusted CA/.test(e.message),
    );
  });

  test("a plain TCP client on the TLS port is told that TLS is required", async () => {
    await assert.rejects(
      Client.connect({ url: broker.addr, service: "todo", token: todoToken, logger: null }),
      (e: unknown) => e instanceof RefusedError && e.code === "handshake_required" && /TLS/.test(e.reason),
    );
  });

  test("a missing CA file is reported with its path", async () => {
    await assert.rejects(
      Client.connect({ url: broker.addr, service: "todo", logger: null, tls: { ca: join(dir, "nope.pem") } }),
      (e: unknown) => e instanceof ConnectionError && e.message.includes("nope.pem"),
    );
  });
});

describe("a manifest with tokens", () => {
  let dir: string;
  let broker: Broker;
  let web: string;
  let todo: string;

  before(async () => {
    dir = tempDir("manifest");
    const webPair = tokenPair();
    const todoPair = tokenPair();
    web = webPair.token;
    todo = todoPair.token;
    const manifest = join(dir, "courier.toml");
    writeFileSync(
      manifest,
      `[services.web]
sends = ["todos.list@1", "todo.create@1"]
receives = ["todo.created@1"]
tokens = ["${webPair.hash}"]

[services.todo]
receives = ["todos.list@1", "todo.create@1"]
sends = ["todo.created@1"]
tokens = ["${todoPair.hash}"]
`,
    );
    broker = await Broker.start({ inMemory: true, args: ["--manifest", manifest] });
  });

  after(async () => {
    await Promise.all(clients.splice(0).map((c) => c.close()));
    await broker.stop();
    removeDir(dir);
  });

  test("the token decides who connects; the manifest what each may send", async () => {
    const todoClient = await connect({ url: broker.addr, service: "todo", token: todo });
    await todoClient.on("todo.create", async (msg) => {
      await msg.reply("todo.created", msg.json());
    });
    const webClient = await connect({ url: broker.addr, service: "web", token: web });
    assert.deepEqual((await webClient.request("todo.create", { n: 1 })).json(), { n: 1 });
    await assert.rejects(webClient.send("todo.delete", {}), (e: unknown) => {
      assert.ok(e instanceof RefusedError);
      assert.equal(e.code, "unauthorized");
      assert.match(e.reason, /web may not send todo\.delete/);
      return true;
    });
    await assert.rejects(
      todoClient.publish("todo.deleted", {}),
      (e: RefusedError) => e.code === "unauthorized",
    );
  });

  test("without a service name the token decides, and the client learns it from WELCOME", async () => {
    const client = await connect({ url: broker.addr, service: "", token: web });
    assert.equal(client.service, "web");
    assert.equal(client.connection?.service, "web");
    const saved = { ...process.env };
    try {
      delete process.env.COURIER_SERVICE;
      process.env.COURIER_TOKEN = todo;
      process.env.COURIER_URL = broker.addr;
      const options = optionsFromEnv({ logger: null });
      assert.equal(options.service, "", "a token in the environment decides the service");
      const fromEnv = await connect(options);
      assert.equal(fromEnv.service, "todo");
    } finally {
      process.env = saved;
    }
  });

  test("a connection without a token, or with another service's, is refused at the handshake", async () => {
    await assert.rejects(
      Client.connect({ url: broker.addr, service: "web", logger: null }),
      (e: unknown) => e instanceof RefusedError && e.code === "unauthorized" && /credentials/.test(e.reason),
    );
    await assert.rejects(
      Client.connect({ url: broker.addr, service: "todo", token: web, logger: null }),
      (e: unknown) => e instanceof RefusedError && e.code === "unauthorized" && /belongs to service web/.test(e.reason),
    );
  });
});
