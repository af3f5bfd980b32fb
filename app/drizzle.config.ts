import { defineConfig } from "drizzle-kit";

// The app's routine config: no schema or table filters. The pipeline keeps its own objects (the audit table)
// in the schema fk_maintenance, which drizzle-kit does not manage ("public" is its default schemaFilter).
export default defineConfig({
  dialect: "postgresql",
  schema: "./src/lib/db/schema.ts",
  out: "./drizzle/migrations",
  migrations: { prefix: "timestamp" },
  dbCredentials: { url: process.env.DATABASE_URL! },
});
