// One aedes node of a Redis-backed cluster.
// env: NODE_ID, MQTT_PORT, WS_PORT, MQTTS_PORT, WSS_PORT (0 = off), REDIS_PORT,
//      TLS_CERT, TLS_KEY, HEARTBEAT_MS (broker liveness beat; dead node's wills after ~4-7 beats)
import { createServer } from 'node:net'
import { createServer as createTlsServer } from 'node:tls'
import { createServer as createHttpServer } from 'node:http'
import { createServer as createHttpsServer } from 'node:https'
import { readFileSync } from 'node:fs'
import { Aedes } from 'aedes'
import persistenceRedis from 'aedes-persistence-redis'
import mqemitterRedis from 'mqemitter-redis'
import { WebSocketServer, createWebSocketStream } from 'ws'

const env = (k, d) => process.env[k] ?? d
const id = env('NODE_ID', 'n1')
const redis = { host: '127.0.0.1', port: Number(env('REDIS_PORT', 6379)) }
const mq = mqemitterRedis({ ...redis })
const persistence = persistenceRedis({ ...redis, maxSessionDelivery: Number(env('MAX_SESSION_DELIVERY', 100000)) })
// Without these a Redis outage crashes every node (unhandled 'error'); ioredis reconnects by itself.
mq.state.on('error', (e) => console.error(`${id}: mqemitter-redis: ${e.message}`))
const broker = await Aedes.createBroker({
  id,
  mq,
  persistence,
  heartbeatInterval: Number(env('HEARTBEAT_MS', 1000)),
  concurrency: Number(env('CONCURRENCY', 1000)),
  queueLimit: 1000,
})

const listen = (srv, port, what) => new Promise((resolve, reject) => {
  srv.once('error', reject)
  srv.listen(port, '127.0.0.1', () => { console.log(`${id}: ${what} on 127.0.0.1:${port}`); resolve() })
})
const wsAttach = (httpSrv) => {
  const wss = new WebSocketServer({ server: httpSrv, path: '/mqtt', handleProtocols: (p) => p.has('mqtt') ? 'mqtt' : false })
  wss.on('connection', (ws, req) => broker.handle(createWebSocketStream(ws), req))
}
const tls = () => ({ cert: readFileSync(env('TLS_CERT')), key: readFileSync(env('TLS_KEY')) })

const port = Number(env('MQTT_PORT', 1883))
await listen(createServer(broker.handle), port, 'mqtt')
if (Number(env('MQTTS_PORT', 0))) await listen(createTlsServer(tls(), broker.handle), Number(env('MQTTS_PORT')), 'mqtts')
if (Number(env('WS_PORT', 0))) { const s = createHttpServer(); wsAttach(s); await listen(s, Number(env('WS_PORT')), 'ws') }
if (Number(env('WSS_PORT', 0))) { const s = createHttpsServer(tls()); wsAttach(s); await listen(s, Number(env('WSS_PORT')), 'wss') }
broker.on('connectionError', (c, e) => console.error(`${id}: connection error ${e.message}`))
console.log(`${id}: ready`)
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => broker.close(() => process.exit(0)))
