// The notifier: subscribes the service `notifier` to the event
// `todo.created` and announces every new todo, one JSON line on stdout per
// event (a real one would mail or push; the line keeps it observable).
import { Client, optionsFromEnv } from "@courier/client";

interface Todo {
  id: number;
  text: string;
}

const client = await Client.connect(optionsFromEnv({ service: "notifier" }));
await client.on("todo.created", (msg) => {
  const todo = msg.json<Todo>();
  // Returning acks the delivery; a throw would nack it for a redelivery.
  console.log(JSON.stringify({ event: msg.name, id: todo.id, text: todo.text }));
});
console.log("notifier ready");

const stop = async (): Promise<void> => {
  // Handlers running finish and their acks go out before the socket closes.
  await client.close();
  console.log("notifier stopped (drained)");
  process.exit(0);
};
process.once("SIGINT", () => void stop());
process.once("SIGTERM", () => void stop());
