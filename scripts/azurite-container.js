// Azurite helper for scripts/s3-bazel-e2e.sh (BUCKET_SERVER=azurite), through Microsoft's own
// client (@azure/storage-blob), so hoard's Azure client is checked against another one:
//   node azurite-container.js PORT create CONTAINER        creates the container
//   node azurite-container.js PORT list CONTAINER PREFIX   prints the blob names under PREFIX
// Azurite's documented development account and key (public, the same in every install).
const { BlobServiceClient } = require("@azure/storage-blob");

const [port, verb, container, prefix] = process.argv.slice(2);
const account = "devstoreaccount1";
const key =
  "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const connection =
  `DefaultEndpointsProtocol=http;AccountName=${account};AccountKey=${key};` +
  `BlobEndpoint=http://127.0.0.1:${port}/${account};`;
const client = BlobServiceClient.fromConnectionString(connection).getContainerClient(container);

async function main() {
  if (verb === "create") {
    await client.createIfNotExists();
  } else if (verb === "list") {
    for await (const blob of client.listBlobsFlat({ prefix })) console.log(blob.name);
  } else {
    throw new Error(`unknown verb ${verb}`);
  }
}
main().catch((e) => {
  console.error(e.message);
  process.exit(1);
});
