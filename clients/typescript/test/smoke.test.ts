import { test } from "node:test";
import assert from "node:assert/strict";
import { Client } from "../src/index.js";
import { Broker } from "./broker.js";

test("smoke", async () => {
  const broker = await Broker.start({ inMemory: true });
  try {
    const todo = await Client.connect({ url: broker.addr, service: "todo" });
    await todo.on("todo.create", async (msg) => {
      await msg.reply("todo.created", msg.json());
    });
    const web = await Client.connect({ url: broker.addr, service: "web" });
    const reply = await web.request("todo.create", { text: "milk" });
    assert.equal(reply.name, "todo.created");
    assert.deepEqual(reply.json(), { text: "milk" });
    assert.equal(reply.sender, "todo");
    await web.close();
    await todo.close();
  } finally {
    await broker.stop();
  }
});
