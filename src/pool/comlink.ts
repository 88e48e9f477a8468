// comlink 4.4.2 has no `exports` map: its ESM build is imported by path (one
// place for that), with the types of its published declarations.
// @ts-ignore -- the .mjs has no declaration file of its own; types come below
import * as comlinkEsm from "comlink/dist/esm/comlink.mjs";
// @ts-ignore -- likewise for the Node adapter
import nodeEndpointEsm from "comlink/dist/esm/node-adapter.mjs";
import type * as ComlinkTypes from "comlink";

export type Remote<T> = ComlinkTypes.Remote<T>;
export type Endpoint = ComlinkTypes.Endpoint;

const c = comlinkEsm as typeof ComlinkTypes;
export const expose = c.expose;
export const wrap = c.wrap;
export const transfer = c.transfer;
export const releaseProxy = c.releaseProxy;
export const nodeEndpoint = nodeEndpointEsm as (nep: unknown) => Endpoint;
