/**
 * What server reflection describes: the billing schema exactly as `buf build`
 * wrote it (generated/billing.binpb), plus the services and types every gRPC
 * tool expects to find next to it:
 * - grpc.health.v1.Health, so that `buf curl .../grpc.health.v1.Health/Check`
 *   works from reflection alone;
 * - grpc.reflection.v1 and v1alpha ServerReflection, the reflection service
 *   itself;
 * - google.rpc.ErrorInfo, the detail every error carries in
 *   grpc-status-details-bin (./status.ts), so that `buf curl` prints it
 *   decoded instead of as base64.
 * Health and reflection are read from the .proto files their packages ship
 * (grpc-health-check, @grpc/reflection: the very services they serve) and
 * ErrorInfo is written here, field by field as in googleapis; nothing is added
 * under proto/ (it is this service's contract, linted by buf).
 */
import * as path from 'node:path';
import * as protoLoader from '@grpc/proto-loader';
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import { BinaryReader, WireType } from '@bufbuild/protobuf/wire';
import {
  FieldDescriptorProto_Label,
  FieldDescriptorProto_Type,
  FileDescriptorProtoSchema,
  type DescriptorProto,
  type FileDescriptorProto,
} from '@bufbuild/protobuf/wkt';
import { protoPath as healthProtoPath } from 'grpc-health-check';

/**
 * generated/billing.binpb, found from src/grpc/ (ts-jest) and from
 * dist/src/grpc/ (compiled; the build copies it to dist/generated/) alike.
 */
export const DESCRIPTOR_SET_PATH = path.resolve(__dirname, '..', '..', 'generated', 'billing.binpb');

const REFLECTION_PROTOS = path.join(path.dirname(require.resolve('@grpc/reflection/package.json')), 'build', 'proto');

/** The FileDescriptorProtos of a FileDescriptorSet { repeated FileDescriptorProto file = 1; }, byte for byte. */
export function splitDescriptorSet(set: Uint8Array): Buffer[] {
  const reader = new BinaryReader(set);
  const files: Buffer[] = [];
  while (reader.pos < reader.len) {
    const [field, type] = reader.tag();
    if (field === 1 && type === WireType.LengthDelimited) files.push(Buffer.from(reader.bytes()));
    else reader.skip(type, field);
  }
  return files;
}

/** protoc's name for the entry message of a map field: `statuses` -> `StatusesEntry`. */
const mapEntryName = (field: string): string =>
  `${field.replace(/(?:^|_)([a-z0-9])/g, (_m, c: string) => c.toUpperCase())}Entry`;

/**
 * protobufjs (under proto-loader) names a map field's entry message after the
 * field alone ("Statuses"); protoc, and every descriptor consumer that checks
 * it (Go's protodesc, so `buf curl`), wants "StatusesEntry".
 */
function fixMapEntryNames(message: DescriptorProto): void {
  for (const field of message.field) {
    const entry = message.nestedType.find((n) => n.options?.mapEntry && n.name === field.typeName.split('.').pop());
    if (!entry) continue;
    const name = mapEntryName(field.name);
    field.typeName = field.typeName.replace(/[^.]+$/, name);
    entry.name = name;
  }
  for (const nested of message.nestedType) fixMapEntryNames(nested);
}

/**
 * One .proto file without imports, as a FileDescriptorProto under its usual
 * name (proto-loader names a file after its package, e.g.
 * "grpc_health_v1.proto"; tools expect "grpc/health/v1/health.proto"), with
 * the proto's own field names (keepCase) and protoc's map entry names.
 */
function fileFromProto(protoFile: string, name: string): Buffer {
  const loaded = protoLoader.loadSync(protoFile, { keepCase: true });
  const files = new Map<string, FileDescriptorProto>();
  for (const def of Object.values(loaded)) {
    for (const bytes of (def as { fileDescriptorProtos?: Buffer[] }).fileDescriptorProtos ?? []) {
      const file = fromBinary(FileDescriptorProtoSchema, bytes);
      files.set(file.name, file);
    }
  }
  if (files.size !== 1) throw new Error(`${protoFile}: expected one file without imports, got ${[...files.keys()].join(', ')}`);
  const [file] = files.values();
  file.name = name;
  for (const message of file.messageType) fixMapEntryNames(message);
  return Buffer.from(toBinary(FileDescriptorProtoSchema, file));
}

/** google/rpc/error_details.proto with its one message this service sends, ErrorInfo (fields as in googleapis). */
function errorInfoFile(): Buffer {
  const { STRING: TYPE_STRING, MESSAGE: TYPE_MESSAGE } = FieldDescriptorProto_Type;
  const { OPTIONAL, REPEATED } = FieldDescriptorProto_Label;
  const file = create(FileDescriptorProtoSchema, {
    name: 'google/rpc/error_details.proto',
    package: 'google.rpc',
    syntax: 'proto3',
    options: { goPackage: 'google.golang.org/genproto/googleapis/rpc/errdetails;errdetails', javaPackage: 'com.google.rpc' },
    messageType: [
      {
        name: 'ErrorInfo',
        field: [
          { name: 'reason', number: 1, label: OPTIONAL, type: TYPE_STRING, jsonName: 'reason' },
          { name: 'domain', number: 2, label: OPTIONAL, type: TYPE_STRING, jsonName: 'domain' },
          { name: 'metadata', number: 3, label: REPEATED, type: TYPE_MESSAGE, typeName: '.google.rpc.ErrorInfo.MetadataEntry', jsonName: 'metadata' },
        ],
        nestedType: [
          {
            name: 'MetadataEntry',
            field: [
              { name: 'key', number: 1, label: OPTIONAL, type: TYPE_STRING, jsonName: 'key' },
              { name: 'value', number: 2, label: OPTIONAL, type: TYPE_STRING, jsonName: 'value' },
            ],
            options: { mapEntry: true },
          },
        ],
      },
    ],
  });
  return Buffer.from(toBinary(FileDescriptorProtoSchema, file));
}

/** The files served next to the billing schema: health, reflection (v1, v1alpha) and google.rpc.ErrorInfo. */
export function standardFiles(): Buffer[] {
  return [
    fileFromProto(healthProtoPath, 'grpc/health/v1/health.proto'),
    fileFromProto(path.join(REFLECTION_PROTOS, 'grpc/reflection/v1/reflection.proto'), 'grpc/reflection/v1/reflection.proto'),
    fileFromProto(path.join(REFLECTION_PROTOS, 'grpc/reflection/v1alpha/reflection.proto'), 'grpc/reflection/v1alpha/reflection.proto'),
    errorInfoFile(),
  ];
}

const isTypeDefinition = (
  def: protoLoader.AnyDefinition,
): def is protoLoader.MessageTypeDefinition<object, object> | protoLoader.EnumTypeDefinition =>
  typeof def.format === 'string' && Array.isArray(def.fileDescriptorProtos);

/**
 * The package definition reflection serves. proto-loader re-derives file
 * descriptors from its parsed schema, merging every file of a package into one
 * that declares no imports; `buf curl` cannot link that (the Timestamp import
 * is missing) and reports "failed to find service". So every type keeps its
 * definition but carries the files exactly as `buf build` wrote them, plus
 * the standard files above (@grpc/reflection indexes every file any entry
 * carries, and lists every service in them).
 */
export function reflectionDefinition(descriptorSet: Buffer, extraFiles: Buffer[] = standardFiles()): protoLoader.PackageDefinition {
  const loaded = protoLoader.loadFileDescriptorSetFromBuffer(descriptorSet);
  const files = [...splitDescriptorSet(descriptorSet), ...extraFiles];
  const definition: protoLoader.PackageDefinition = {};
  for (const [name, def] of Object.entries(loaded)) {
    // Message and enum entries carry descriptors; service entries are maps of methods.
    definition[name] = isTypeDefinition(def) ? { ...def, fileDescriptorProtos: files } : def;
  }
  return definition;
}
