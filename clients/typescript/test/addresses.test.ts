// Several broker addresses in `url`: how they are read, the order each
// connection attempt tries them in, and a client that carries on with the
// second broker when the first one is killed.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Client, ConnectionError, InvalidMessageError, type ClientOptions } from "../src/index.js";
import { parseAddresses, rotation } from "../src/options.js";
import { Broker, eventually, freePort } from "./broker.js";

describe("broker addresses", () => {
  test("a url is one address or several separated by commas, each trimmed", () => {
    const written = (url: string): string[] => parseAddresses(url).map((a) => a.address);
    assert.deepEqual(written("127.0.0.1:7700"), ["127.0.0.1:7700"]);
    assert.deepEqual(written("a:1,b:2"), ["a:1", "b:2"], "no spaces");
    assert.deepEqual(written(" a:1 ,  b:2,c:3 "), ["a:1", "b:2", "c:3"], "spaces around the commas");
    assert.deepEqual(written("[::1]:7700,[::1]:7701"), ["[::1]:7700", "[::1]:7701"]);
    assert.deepEqual(parseAddresses("[::1]:7700, h:2"), [
      { address: "[::1]:7700", host: "::1", port: 7700 },
      { address: "h:2", host: "h", port: 2 },
    ]);
  });

  test("an empty entry is an error that says what to write", () => {
    for (const bad of ["", " ", "a:1,", ",a:1", "a:1,,b:2", "a:1, ,b:2"]) {
      assert.throws(
        () => parseAddresses(bad),
        (e: unknown) =>
          e instanceof InvalidMessageError &&
          e.message.includes("empty entry") &&
          e.message.includes("127.0.0.1:7701,127.0.0.1:7702"),
        JSON.stringify(bad),
      );
    }
  });

  test("each entry must be host:port, and the error names the entry", () => {
    for (const [url, entry] of [
      ["a:1,b", "b"],
      ["a:1, b:0", "b:0"],
      ["a:x,b:2", "a:x"],
    ] as const) {
      assert.throws(
        () => parseAddresses(url),
        (e: unknown) => e instanceof InvalidMessageError && e.message.includes(JSON.stringify(entry)),
        url,
      );
    }
  });

  test("Client.connect refuses a url with an empty entry before connecting anywhere", async () => {
    await assert.rejects(
      Client.connect({ url: "127.0.0.1:7701,,127.0.0.1:7702", service: "web", logger: null }),
      (e: unknown) => e instanceof InvalidMessageError && /empty entry/.test(e.message),
    );
  });

  test("each attempt starts after the address connected to last", () => {
    assert.deepEqual(rotation(1, undefined), [0]);
    assert.deepEqual(rotation(1, 0), [0], "one address: always that one");
    assert.deepEqual(rotation(3, undefined), [0, 1, 2], "the first connect: as written");
    assert.deepEqual(rotation(3, 0), [1, 2, 0], "the one that died comes last");
    assert.deepEqual(rotation(3, 1), [2, 0, 1]);
    assert.deepEqual(rotation(3, 2), [0, 1, 2], "round past the end");
    assert.deepEqual(rotation(0, undefined), []);
  });

  test("when every address fails, the error names each one in the order tried", async () => {
    const [first, second] = [`127.0.0.1:${await freePort()}`, `127.0.0.1:${await freePort()}`];
    await assert.rejects(Client.connect({ url: `${first},${second}`, service: "web", logger: null }), (e: unknown) => {
      assert.ok(e instanceof ConnectionError, String(e));
      const at = [e.message.indexOf(`${first} (`), e.message.indexOf(`${second} (`)];
      assert.ok(at[0]! >= 0 && at[1]! > at[0]!, e.message);
      assert.match(e.message, /ECONNREFUSED/);
      return true;
    });
  });
});

describe("a client with several brokers", () => {
  let first: Broker;
  let second: Broker;
  const clients: Client[] = [];

  async function connect(service: string, url: string, options: Partial<ClientOptions> = {}): Promise<Client> {
    const client = await Client.connect({
      url,
      service,
      logger: null,
      reconnectDelayMinMs: 20,
      reconnectDelayMaxMs: 200,
      drainTimeoutMs: 500,
      ...options,
    });
    clients.push(client);
    return client;
  }

  before(async () => {
    [first, second] = await Promise.all([Broker.start(), Broker.start()]);
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await Promise.all([first.stop(), second.stop()]);
  });

  test("a dead address is passed over for the next", async () => {
    const dead = `127.0.0.1:${await freePort()}`;
    const client = await connect("web", `${dead} , ${first.addr}`);
    assert.equal(client.brokerAddress, first.addr);
    await client.flush();
  });

  test("when its broker is killed the client carries on with the next: unacknowledged sends go there with their ids, its handler receives there", async () => {
    const both = `${first.addr},${second.addr}`;
    // The service's subscriptions, on the second broker too (in a cluster
    // every node knows them): what reaches it waits there for the handler.
    const early = await connect("ledger", second.addr);
    await early.on("ledger.entry", () => {});
    await early.on("ledger.balance", () => {});
    await early.close();

    const got = new Set<string>();
    const ledger = await connect("ledger", both);
    await ledger.on("ledger.entry", (msg) => {
      got.add(msg.id);
    });
    await ledger.on("ledger.balance", async (msg) => {
      await msg.reply("ledger.balance-told", { entries: got.size });
    });
    const teller = await connect("teller", both);
    assert.equal(ledger.brokerAddress, first.addr, "the first connect tries the addresses as written");
    assert.equal(teller.brokerAddress, first.addr);

    const accepted: string[] = [];
    const sends: Array<Promise<unknown>> = [];
    const publish = (from: number, to: number): void => {
      for (let i = from; i < to; i++) {
        sends.push(teller.publish("ledger.entry", { i }).then((id) => accepted.push(id)));
      }
    };
    publish(0, 50);
    await Promise.all(sends);
    await eventually("the first broker delivered the first 50", () => accepted.every((id) => got.has(id)));

    // Frozen, the first broker answers nothing: these 50 are unacknowledged when it dies.
    first.freeze();
    publish(50, 100);
    await new Promise((r) => setTimeout(r, 50)); // written to the socket, and unanswered
    assert.equal(accepted.length, 50, "nothing was accepted after the freeze");
    await first.kill();

    await eventually(
      "both clients moved to the second broker",
      () => ledger.connected && teller.connected && ledger.brokerAddress === second.addr && teller.brokerAddress === second.addr,
    );
    publish(100, 150);
    await Promise.all(sends);
    assert.equal(accepted.length, 150, "every send was accepted in the end, by the second broker");
    assert.equal(new Set(accepted).size, 150);
    await eventually("the handler received every message on the second broker", () => accepted.every((id) => got.has(id)));

    const told = await teller.request("ledger.balance", {}, { timeoutMs: 10_000 });
    assert.equal(told.name, "ledger.balance-told");
    assert.ok(told.json<{ entries: number }>().entries >= 150);

    // The second one dies too, the first is back: round the list to it.
    await first.restart();
    await second.kill();
    await eventually(
      "both clients went round to the first broker",
      () => ledger.connected && teller.connected && ledger.brokerAddress === first.addr && teller.brokerAddress === first.addr,
    );
    const last = await teller.publish("ledger.entry", { i: 150 });
    await eventually("the handler received on the first broker again", () => got.has(last));
  });
});
